"""Where a model's files are, and its tokenizer: `demo` → the built (cached) demo model; anything else is a
local directory or a hub name. Shared by training, the data builder's CLI and evaluation."""

from __future__ import annotations

import os

from clo_fast.constants import DEFAULT_CACHE_DIR, WORLD_NAME
from clo_fast.paths import looks_local


def resolve_model_path(name_or_path: str, cache_dir: str = DEFAULT_CACHE_DIR, gguf_file: str | None = None) -> str:
    """`demo` → the built (cached) demo model directory; a GGUF file (or a GGUF model's name) → its converted
    folder (clo_fast/gguf_model.py); anything else is passed to from_pretrained."""
    from clo_fast.gguf_model import ensure_converted, gguf_file_of

    gguf = gguf_file_of(name_or_path, gguf_file)
    if gguf is not None:
        return str(ensure_converted(gguf, cache_dir))
    if name_or_path == "demo":
        from clo_fast.demo_model import ensure_demo_model

        return str(ensure_demo_model(cache_dir))
    if name_or_path == WORLD_NAME:  # the miniature fact world's base model (built and cached)
        from clo_fast.world import ensure_world

        return str(ensure_world(cache_dir) / "base")
    path = os.path.expanduser(name_or_path)
    if looks_local(name_or_path) and not os.path.exists(path):
        from clo_fast.config import ConfigError

        raise ConfigError(
            f"model.name_or_path: local model folder not found: {path} "
            "(a hub model is named 'name' or 'owner/name'; a local one must exist)"
        )
    return path


def model_folder_problem(path: str) -> str | None:
    """Why a local folder given as the model to train cannot be started from as it is, with the one-line command
    that makes it a model folder (None when it is one, or not a local folder):
    - a LoRA adapter (adapter_config.json; a PEFT run's HF Trainer checkpoint too): merged into its base first;
    - an HF Trainer checkpoint of DeepSpeed ZeRO shards without model weights: gathered by DeepSpeed's own script;
    - a clo_fast checkpoint: continued with --resume, or trained on from its run's hf_model export."""
    from pathlib import Path

    from clo_fast.atomic import is_ours

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    if (folder / "adapter_config.json").is_file():
        from clo_fast.atomic import enclosing_output

        outer = enclosing_output(folder)  # a run's hf_adapter: the merged model goes beside the run, not in it
        merged = f"{outer[0]}-{folder.name}-merged" if outer else f"{folder}-merged"
        return (
            f"{folder} is a LoRA adapter (adapter_config.json), not a model: merge it into its base model first, "
            f"`python -m clo_fast.merge_adapter {folder} {merged}`, then set model.name_or_path: {merged} (and "
            "model.lora to train a new adapter on top)"
        )
    if is_ours(folder, "checkpoint"):
        return (
            f"{folder} is a clo_fast checkpoint: continue its run with `--resume {folder.name}` (same config), or "
            "start from the model its run exported (<output_dir>/hf_model)"
        )
    weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    for f in sorted(folder.glob("*.safetensors")):
        damaged = safetensors_problem(f)
        if damaged:
            return f"{f}: {damaged}; copy the model folder again"
    if (folder / "trainer_state.json").is_file() and not weights and list(folder.glob("global_step*")):
        full = f"{folder}-fp32"
        return (
            f"{folder} is an HF Trainer checkpoint holding DeepSpeed ZeRO shards only (global_step*/), no model "
            f"weights: gather them first, `python -m deepspeed.utils.zero_to_fp32 {folder} {full} "
            f"--safe_serialization`, copy config.json and the tokenizer files beside them, then set "
            f"model.name_or_path: {full}"
        )
    return None


def safetensors_problem(path) -> str | None:
    """Why a .safetensors file cannot be loaded, read from its header alone (no tensor is read): a truncated file
    (a copy cut short) is found at start-up, not when the model loads after the data stage. None when it looks
    whole."""
    import json
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes, no safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"truncated ({size} bytes; its header alone claims {n})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"not a readable safetensors file ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    return f"truncated ({size} bytes, its header lists {need})" if size < need else None


def trainer_checkpoint_note(path: str) -> str | None:
    """A note for starting from an HF Trainer checkpoint that holds model weights (checkpoint-N/ with
    trainer_state.json): its weights are used, its optimizer, scheduler and step are not (they are the Trainer's)."""
    from pathlib import Path

    folder = Path(path).expanduser()
    if folder.is_dir() and (folder / "trainer_state.json").is_file() and model_folder_problem(path) is None:
        return (
            f"model.name_or_path {folder} is an HF Trainer checkpoint: training starts from its weights; its "
            "optimizer state, LR schedule and step count are not carried over (this is a new run)"
        )
    return None


def load_tokenizer(model, cache_dir: str = DEFAULT_CACHE_DIR):
    """Tokenizer of a model directory / hub name, or of a `ModelConfig` (`demo` resolves to the demo model).
    Gets a pad token (EOS) when the model has none."""
    from transformers import AutoTokenizer

    if isinstance(model, (str, os.PathLike)):
        path = model
    else:
        path = resolve_model_path(model.name_or_path, cache_dir, getattr(model, "gguf_file", None))
    tok = AutoTokenizer.from_pretrained(str(path))
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tokenizer) -> None:
    """Batches need a pad token: Llama-3 and many base models ship without one, so EOS stands in."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


def _looks_like_git_hash(name: str) -> bool:
    return len(name) in (40, 64) and all(c in "0123456789abcdef" for c in name)


def model_fingerprint(path: str, memo_dir: str | None = None) -> str:
    """A hash of a model's content: every file of its directory (config and weights), for keys of caches derived
    from the weights (the reference log-probs). A hub name resolves to its cached snapshot; files of the hub
    cache are symlinks to blobs named by their content hash, which stands in for reading them.

    `memo_dir`: a folder where each local file's sha256 is remembered with its size, mtime, inode and ctime, so
    that the next run (a resume, a sweep) reads a large model's weights only when they changed."""
    import hashlib
    import json
    from pathlib import Path

    root = Path(path).expanduser()
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(str(path), local_files_only=True))
        except Exception as e:  # not a local folder and not in the hub cache: nothing to fingerprint
            raise ValueError(f"model {path!r}: neither a local folder nor in the Hugging Face cache ({e})") from e
    memo_file = None
    memo: dict = {}
    if memo_dir is not None:
        name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
        memo_file = Path(os.path.expanduser(memo_dir)) / "fingerprints" / f"{name}.json"
        try:
            memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs a re-hash
    fresh: dict = {}
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts):
        rel = str(f.relative_to(root))
        h.update(rel.encode() + b"\0")
        target = f.resolve()
        if f.is_symlink() and _looks_like_git_hash(target.name):
            h.update(target.name.encode())
            continue
        st = target.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]  # any rewrite changes one of them
        known = memo.get(rel)
        if known and known[:-1] == stamp:
            digest = known[-1]
        else:
            sha = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    sha.update(block)
            digest = sha.hexdigest()
        fresh[rel] = stamp + [digest]
        h.update(digest.encode())
    if memo_file is not None and fresh != memo:
        from clo_fast.atomic import write_text_atomic

        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo_file, json.dumps(fresh))
    return h.hexdigest()


def resolve_model_path_without_collective(
    name_or_path: str, cache_dir: str, rank: int, poll_s: float = 2.0, gguf_file: str | None = None
) -> str:
    """`resolve_model_path` in a launched world without a collective: rank 0 builds the demo model (or converts
    a GGUF file) when it is not cached yet, the other ranks wait for it on disk (a barrier would time out)."""
    import time

    from clo_fast.gguf_model import converted_dir, gguf_file_of

    gguf = gguf_file_of(name_or_path, gguf_file)
    if gguf is not None and rank != 0:
        while not (converted_dir(gguf, cache_dir) / "config.json").is_file():
            time.sleep(poll_s)
    if name_or_path not in ("demo", WORLD_NAME) or rank == 0:
        return resolve_model_path(name_or_path, cache_dir, gguf_file)
    if name_or_path == WORLD_NAME:
        from clo_fast.world import world_dir

        while not (world_dir(cache_dir) / "base" / "config.json").is_file():
            time.sleep(poll_s)
        return resolve_model_path(name_or_path, cache_dir)
    from clo_fast.demo_model import demo_model_path

    final = demo_model_path(cache_dir)
    while not (final / "config.json").is_file():
        time.sleep(poll_s)
    return resolve_model_path(name_or_path, cache_dir)
