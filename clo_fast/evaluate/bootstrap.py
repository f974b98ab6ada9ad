"""Paired bootstrap over the real units (entities × seeds), and the rules that decide a claim, all fixed before
any run.

A comparison of method A against method B on one per-prompt metric (1/0 per prompt: answered in the prompt's
language, answered correctly ...) is a matrix D[p, s] = a[p, s] − b[p, s] over the same prompts p and the same
seeds s (seed s of A and seed s of B share optim.seed). The effect is the mean of D. The prompts are not
independent: the world asks four questions about each entity, so a prompt belongs to a cluster (its entity). The
95% interval resamples clusters and seeds independently, with replacement (a two-way cluster bootstrap: both the
entity sample and the seed sample are random; a resampled mean is the mean over the drawn clusters' prompts), and
takes the 2.5th and 97.5th percentiles of the resampled means. The resampling is seeded (BOOTSTRAP_SEED), so a
comparison's interval is a function of its data. Beside it, as a check, a t-interval over the per-seed means
(seeds as the only random unit).

Chance (`chance_bar`): a model is *above chance* on a measure when the one-sided 95% lower bound of its mean (the
same cluster bootstrap) exceeds both 1/6 (a value guessed from the six) and its own answers' shuffled accuracy (the
same answers moved to other entities of the same attribute: a degenerate model, one fixed answer for every
entity, scores exactly that, so it is never above chance however lucky its fixed answer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0
INTERVAL = 0.95
# The verdict rule, written before the run (README and compare.md state it):
# "beats":   confirmed when the interval's lower bound > 0; refuted when its upper bound < 0; else inconclusive.
# "matches": "matches or beats": confirmed when the lower bound > −MATCH_MARGIN; refuted when the upper bound
#            < −MATCH_MARGIN; else inconclusive.
# "keeps":   non-inferiority: confirmed when the lower bound > −KEEP_MARGIN (the method loses less than the margin
#            against what it is compared with); refuted when the upper bound < −KEEP_MARGIN; else inconclusive.
# Before any of these: a claim is *untestable* when neither side of its comparison is above chance on its measure
# (nothing to beat, match or keep); and "beats" / "matches" cannot be confirmed for a method that is not itself
# above chance (a degenerate answer passes nothing): that is "inconclusive".
MATCH_MARGIN = 0.03
KEEP_MARGIN = 0.05
CLAIM_KINDS = ("beats", "matches", "keeps")
CHANCE = 1 / 6  # the closed sets' size: a value guessed at random
CHANCE_SIDED = 0.95  # one-sided level of the above-chance test
# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (the per-seed check)
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


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


def _cluster_sums(d: np.ndarray, clusters) -> tuple[np.ndarray, np.ndarray]:
    """(sums [clusters, seeds] of d's rows per cluster, prompts per cluster), clusters in first-seen order."""
    if clusters is None:
        return d, np.ones(d.shape[0], dtype=np.float64)
    labels = list(clusters)
    if len(labels) != d.shape[0]:
        raise ValueError(f"{len(labels)} cluster labels for {d.shape[0]} prompts")
    index = {c: i for i, c in enumerate(dict.fromkeys(labels))}
    rows = np.array([index[c] for c in labels])
    sums = np.zeros((len(index), d.shape[1]), dtype=np.float64)
    np.add.at(sums, rows, d)
    return sums, np.bincount(rows, minlength=len(index)).astype(np.float64)


def _resampled_means(d: np.ndarray, clusters, draws: int, seed: int) -> np.ndarray:
    sums, sizes = _cluster_sums(d, clusters)
    n_c, n_s = sums.shape
    c_counts, s_counts = bootstrap_draws(n_c, n_s, draws, seed)
    return np.einsum("bc,cs,bs->b", c_counts, sums, s_counts) / ((c_counts @ sizes) * n_s)


def seed_t_interval(diff) -> dict | None:
    """{"mean", "lo", "hi"}: the 95% t-interval over the per-seed means of a [prompts, seeds] matrix (the seeds as
    the only random unit); None below two seeds."""
    d = np.asarray(diff, dtype=np.float64)
    per_seed = d.mean(axis=0)
    n = per_seed.size
    if n < 2:
        return None
    if n - 1 > len(T975):
        raise ValueError(f"seed t-interval: at most {len(T975) + 1} seeds, got {n}")
    half = T975[n - 2] * per_seed.std(ddof=1) / np.sqrt(n)
    m = float(per_seed.mean())
    return {"mean": m, "lo": float(m - half), "hi": float(m + half)}


def paired_bootstrap(diff, clusters=None, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> dict:
    """{"mean", "lo", "hi", "n_prompts", "n_clusters", "n_seeds", "t"} of a [prompts, seeds] matrix of paired
    differences. clusters: one label per prompt (its entity); None: each prompt its own cluster. The mean of a
    resample with cluster counts c and seed counts k is Σ_cs c_c D_cs k_s / (Σ_c c_c n_c · S), D_cs the sum of
    cluster c's prompts in seed s and n_c its size. "t": `seed_t_interval`, the check beside it."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"paired differences must be a non-empty [prompts, seeds] matrix, got shape {d.shape}")
    means = _resampled_means(d, clusters, draws, seed)
    tail = (1.0 - INTERVAL) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    n_c = d.shape[0] if clusters is None else len(set(clusters))
    return {
        "mean": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "n_prompts": d.shape[0],
        "n_clusters": n_c,
        "n_seeds": d.shape[1],
        "t": seed_t_interval(d),
    }


def lower_bound(values, clusters=None, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> float:
    """One-sided CHANCE_SIDED lower bound of the mean of a [prompts, seeds] matrix of scores (cluster bootstrap)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"scores must be a non-empty [prompts, seeds] matrix, got shape {v.shape}")
    return float(np.percentile(_resampled_means(v, clusters, draws, seed), (1.0 - CHANCE_SIDED) * 100))


def shuffled_accuracy(given, attributes, answers) -> float:
    """Expected accuracy of a model's own answers shuffled among the prompts of the same attribute: what its answer
    distribution scores without knowing which entity is asked about. given: the value it named per prompt (None:
    none, or not in the prompt's language); attributes, answers: each prompt's attribute and right value. For one
    fixed answer per attribute this equals its accuracy; for answers spread like the truth, about 1/6."""
    from collections import Counter

    given, attributes, answers = list(given), list(attributes), list(answers)
    if not given or not len(given) == len(attributes) == len(answers):
        raise ValueError("shuffled accuracy: one given answer, attribute and right answer per prompt")
    total = 0.0
    for a in set(attributes):
        rows = [i for i, x in enumerate(attributes) if x == a]
        n_given = Counter(given[i] for i in rows if given[i] is not None)
        n_true = Counter(answers[i] for i in rows)
        total += sum(n_given[v] * n_true[v] for v in n_given) / len(rows)
    return total / len(given)


def chance_bar(given_per_seed, attributes, answers) -> float:
    """The bar a model's accuracy must clear to be *above chance*: the larger of CHANCE (1/6) and its answers'
    shuffled accuracy (mean over its seeds), so that a degenerate answer never clears it."""
    per_seed = [shuffled_accuracy(g, attributes, answers) for g in given_per_seed]
    return max(CHANCE, float(np.mean(per_seed)))


def verdict(kind: str, lo: float, hi: float, testable: bool = True, competent: bool = True) -> str:
    """confirmed / refuted / inconclusive / untestable for a claim of `kind` (CLAIM_KINDS) from its interval.
    testable: some side of the comparison is above chance on the claim's measure; competent: the claimed method
    itself is (a "beats" or "matches" claim is not confirmed for a method at chance)."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind must be one of {CLAIM_KINDS}, got {kind!r}")
    if not testable:
        return "untestable"
    bar = {"beats": 0.0, "matches": -MATCH_MARGIN, "keeps": -KEEP_MARGIN}[kind]
    if lo > bar and (competent or kind == "keeps"):
        return "confirmed"
    if hi < bar:
        return "refuted"
    return "inconclusive"


def rule_text() -> str:
    """The verdict rule in words, for compare.md."""
    return (
        f"Verdict rule (fixed before the run): a claim is *untestable* when neither side of its comparison is above "
        f"chance on its measure (the one-sided {CHANCE_SIDED:.0%} lower bound of its mean above 1/6 and above its "
        f"own answers shuffled across entities, which a degenerate answer cannot clear). Otherwise a claim that a "
        f"method *beats* another is confirmed when the {INTERVAL:.0%} interval of the difference lies above 0 and "
        f"the method is above chance, refuted when the interval lies below 0; *matches or beats*: confirmed when "
        f"the lower bound is above −{MATCH_MARGIN:g} and the method is above chance, refuted when the upper bound "
        f"is below −{MATCH_MARGIN:g}; *keeps* (non-inferiority): confirmed when the lower bound is above "
        f"−{KEEP_MARGIN:g}, refuted when the upper bound is below −{KEEP_MARGIN:g}; anything else is inconclusive. "
        f"Intervals: paired bootstrap over entities × seeds ({BOOTSTRAP_DRAWS:,} resamples, seeded); t over "
        f"per-seed means beside them as a check."
    )


def summarize(values: Sequence[float | None]) -> dict:
    """{"values", "n", "mean", "std"}: the sample standard deviation (n − 1), None below two values; a None
    value (a metric a model could not get) makes mean and std None."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return {"values": vals, "n": len(vals), "mean": None, "std": None}
    mean = math.fsum(vals) / len(vals)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"values": vals, "n": len(vals), "mean": mean, "std": std}
