"""Where a model's files are, and its tokenizer: `demo` → the built (cached) demo model; anything else is a
local directory or a hub name. Shared by training, the data builder's CLI and evaluation."""

from __future__ import annotations

import os

from clo_fast.constants import DEFAULT_CACHE_DIR


def resolve_model_path(name_or_path: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """`demo` → the built (cached) demo model directory; anything else is passed to from_pretrained."""
    if name_or_path == "demo":
        from clo_fast.demo_model import ensure_demo_model

        return str(ensure_demo_model(cache_dir))
    return os.path.expanduser(name_or_path)


def load_tokenizer(model, cache_dir: str = DEFAULT_CACHE_DIR):
    """Tokenizer of a model directory / hub name, or of a `ModelConfig` (`demo` resolves to the demo model).
    Gets a pad token (EOS) when the model has none."""
    from transformers import AutoTokenizer

    path = model if isinstance(model, (str, os.PathLike)) else resolve_model_path(model.name_or_path, cache_dir)
    tok = AutoTokenizer.from_pretrained(str(path))
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tokenizer) -> None:
    """Batches need a pad token: Llama-3 and many base models ship without one, so EOS stands in."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
