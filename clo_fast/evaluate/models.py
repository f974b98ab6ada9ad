"""Loading the models to compare (local directory, hub name or `demo`), with errors that name the path."""

from __future__ import annotations

import os

import torch

from clo_fast.config import RunConfig
from clo_fast.constants import WORLD_NAME
from clo_fast.evaluate.errors import EvalError
from clo_fast.paths import looks_local
from clo_fast.pretrained import ensure_pad_token, resolve_model_path


def load_model(path: str, cfg: RunConfig, device: torch.device | None = None):
    """(model, tokenizer) from a local HF directory, a hub name or `demo`; errors name the path.

    The tokenizer gets a pad token (EOS when it has none). Model in eval mode, `cfg.model.dtype`, on `device`
    (default: the current GPU, else CPU), or sharded by accelerate when `cfg.eval.device_map` is set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    if path in ("demo", WORLD_NAME):  # the demo model / the world's base (built and cached, as training resolves it)
        path = resolve_model_path(path, cfg.data.cache_dir)
    local = os.path.expanduser(path)
    if os.path.exists(local):
        if not os.path.isdir(local):
            raise EvalError(f"model path {path!r} is a file, expected a Hugging Face model directory")
        if not os.access(local, os.R_OK | os.X_OK):
            raise EvalError(f"model path {path!r} is not readable (permissions)")
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise EvalError(f"model path {path!r} has no config.json: not a Hugging Face model directory")
        src = local
    elif looks_local(path):
        raise EvalError(f"model path {path!r} does not exist")
    else:
        src = path  # hub name
    dtype = getattr(torch, cfg.model.dtype)  # model.dtype names a torch dtype (validated at load)
    where = "" if src == local else " (no such local directory; tried as a hub name)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise EvalError(f"cannot load the tokenizer of model {path!r}{where}: {type(e).__name__}: {e}") from e
    # eval.device_map: auto shards the model over every visible GPU (accelerate places the layers)
    placement = {"device_map": cfg.eval.device_map} if cfg.eval.device_map else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=dtype, attn_implementation=cfg.model.attn_implementation, **placement
        )
    except Exception as e:
        raise EvalError(f"cannot load model {path!r}{where}: {type(e).__name__}: {e}") from e
    try:
        ensure_pad_token(tokenizer)
    except ValueError as e:
        raise EvalError(str(e)) from None
    return (model if placement else model.to(device)).eval(), tokenizer


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
