"""Paired bootstrap over prompts × seeds, and the verdict rule for a claim, both fixed before any run.

A comparison of method A against method B on one per-prompt metric (1/0 per prompt: answered in the prompt's
language, answered correctly ...) is a matrix D[p, s] = a[p, s] − b[p, s] over the same prompts p and the same
seeds s (seed s of A and seed s of B share optim.seed). The effect is the mean of D. Its 95% interval resamples
prompts and seeds independently, with replacement (a two-way bootstrap: both the prompt sample and the seed sample
are random), and takes the 2.5th and 97.5th percentiles of the resampled means. The resampling is seeded
(BOOTSTRAP_SEED), so a comparison's interval is a function of its data.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0
INTERVAL = 0.95
# The verdict rule, written before the run (README and compare.md state it):
# "beats":   confirmed when the interval's lower bound > 0; refuted when its upper bound < 0; else inconclusive.
# "matches": "matches or beats": confirmed when the lower bound > −MATCH_MARGIN; refuted when the upper bound
#            < −MATCH_MARGIN; else inconclusive.
MATCH_MARGIN = 0.03
CLAIM_KINDS = ("beats", "matches")


def bootstrap_draws(n_prompts: int, n_seeds: int, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED):
    """(prompt_counts [draws, n_prompts], seed_counts [draws, n_seeds]): how often each prompt / seed is drawn in
    each resample (multinomial counts of a draw with replacement)."""
    rng = np.random.default_rng(seed)
    p_idx = rng.integers(0, n_prompts, size=(draws, n_prompts))
    s_idx = rng.integers(0, n_seeds, size=(draws, n_seeds))
    p_counts = np.zeros((draws, n_prompts), dtype=np.float64)
    s_counts = np.zeros((draws, n_seeds), dtype=np.float64)
    rows = np.arange(draws)[:, None]
    np.add.at(p_counts, (rows, p_idx), 1.0)
    np.add.at(s_counts, (rows, s_idx), 1.0)
    return p_counts, s_counts


def paired_bootstrap(diff, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> dict:
    """{"mean", "lo", "hi", "n_prompts", "n_seeds"} of a [prompts, seeds] matrix of paired differences: the mean
    of every resample of prompts × seeds is Σ_ij c_i d_ij k_j / (P·S) for prompt counts c and seed counts k."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"paired differences must be a non-empty [prompts, seeds] matrix, got shape {d.shape}")
    n_p, n_s = d.shape
    p_counts, s_counts = bootstrap_draws(n_p, n_s, draws, seed)
    means = np.einsum("bp,ps,bs->b", p_counts, d, s_counts) / (n_p * n_s)
    tail = (1.0 - INTERVAL) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n_prompts": n_p, "n_seeds": n_s}


def verdict(kind: str, lo: float, hi: float) -> str:
    """confirmed / refuted / inconclusive for a claim of `kind` (CLAIM_KINDS) from its interval."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind must be one of {CLAIM_KINDS}, got {kind!r}")
    bar = 0.0 if kind == "beats" else -MATCH_MARGIN
    if lo > bar:
        return "confirmed"
    if hi < bar:
        return "refuted"
    return "inconclusive"


def rule_text() -> str:
    """The verdict rule in words, for compare.md."""
    return (
        f"Verdict rule (fixed before the run): a claim that CLO *beats* SFT is confirmed when the "
        f"{INTERVAL:.0%} interval of the difference lies above 0, refuted when it lies below 0; a claim that CLO "
        f"*matches or beats* SFT is confirmed when the interval's lower bound is above −{MATCH_MARGIN:g}, refuted "
        f"when its upper bound is below −{MATCH_MARGIN:g}; anything else is inconclusive. Intervals: paired "
        f"bootstrap over prompts × seeds ({BOOTSTRAP_DRAWS:,} resamples, seeded)."
    )
