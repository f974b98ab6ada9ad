"""The train/eval split, stated once: the data builder and the demo model's pretraining both use it."""

from __future__ import annotations

import random
import unicodedata


def eval_size(n: int, eval_fraction: float) -> int:
    """How many of n shuffled examples are held out: round(n × fraction), at least 1 and at most n − 1
    when the fraction is positive (the demo model's pretraining excludes the same examples)."""
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(1, n_eval), n - 1)
    return n_eval


def shuffled_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def prompt_key(text: str) -> str:
    """What counts as the same prompt: case, whitespace and Unicode compatibility forms (full-width letters)
    ignored."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def conversation_key(context: list[dict] | None, prompt: str) -> tuple:
    """What counts as the same prompt of a conversation: the earlier turns (role and text) and the last prompt,
    each compared as `prompt_key` does. Two equal follow-up questions in different conversations differ."""
    return tuple((t["role"], prompt_key(t["content"])) for t in context or []) + (prompt_key(prompt),)


def deduplicate(items: list, key) -> tuple[list, int]:
    """(items with each key's first occurrence only, how many were dropped). `key(item)` is one key or a tuple
    of keys (None entries ignored): an item sharing any of its keys with an earlier one is a duplicate. Done
    before the split, so no held-out prompt is also a training prompt."""
    seen: set = set()
    kept = []
    for item in items:
        keys = key(item)
        keys = [k for k in (keys if isinstance(keys, tuple) else (keys,)) if k is not None]
        if not any(k in seen for k in keys):
            kept.append(item)
        seen.update(keys)
    return kept, len(items) - len(kept)


def require_examples(split: str, n: int, why: str) -> None:
    """An empty split is an error, not a run that fails later with an IndexError."""
    from clo_fast.config import ConfigError

    if n == 0:
        raise ConfigError(f"the {split} split has no examples: {why}")
