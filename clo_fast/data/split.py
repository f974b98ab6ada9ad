"""The train/eval split, stated once: the data builder and the demo model's pretraining both use it."""

from __future__ import annotations

import random


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
