"""clo_fast.compare and its library (clo_fast.evaluate.comparison): the statistics against float64 references,
the method plan, chrF's wiring, and one small end-to-end comparison (slow: it trains)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clo_fast.atomic import marked_kind
from clo_fast.compare import CLAIMS, CONTROLLED, SEARCH_GRIDS, grid_settings, plan_methods
from clo_fast.config import ConfigError, load_config
from clo_fast.evaluate.bootstrap import (
    KEEP_MARGIN,
    MATCH_MARGIN,
    bootstrap_draws,
    chance_bar,
    lower_bound,
    paired_bootstrap,
    seed_t_interval,
    shuffled_accuracy,
    verdict,
)
from clo_fast.evaluate.comparison import (
    METRICS,
    aggregate,
    claim_verdicts,
    competence,
    differences,
    metric_names,
    render_comparison_markdown,
    summarize,
)
from clo_fast.evaluate.report import corpus_chrf, response_metrics

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def test_summarize_matches_float64_numpy():
    rng = np.random.default_rng(random.randrange(2**32))
    for n in (2, 3, 7):
        vals = rng.normal(rng.uniform(-5, 5), rng.uniform(0.01, 3), size=n).tolist()
        s = summarize(vals)
        assert s["n"] == n and s["values"] == vals
        assert s["mean"] == pytest.approx(np.mean(np.float64(vals)), rel=1e-12, abs=1e-12)
        assert s["std"] == pytest.approx(np.std(np.float64(vals), ddof=1), rel=1e-12, abs=1e-12)
    one = summarize([0.25])
    assert one["mean"] == 0.25 and one["std"] is None  # no spread from one seed
    assert summarize([1.0, None])["mean"] is None  # a missing value is not averaged away


def test_paired_bootstrap_matches_a_float64_loop_over_the_same_draws():
    """The counts/einsum form of the two-way bootstrap equals the mean of each resampled prompts × seeds grid."""
    rng = np.random.default_rng(random.randrange(2**32))
    n_p, n_s, draws, seed = int(rng.integers(5, 40)), int(rng.integers(2, 6)), 300, int(rng.integers(1000))
    d = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 2), size=(n_p, n_s))
    got = paired_bootstrap(d, draws=draws, seed=seed)
    draw_rng = np.random.default_rng(seed)  # the same draws, as indices
    p_idx = draw_rng.integers(0, n_p, size=(draws, n_p))
    s_idx = draw_rng.integers(0, n_s, size=(draws, n_s))
    means = np.array([d[np.ix_(p_idx[b], s_idx[b])].mean() for b in range(draws)], dtype=np.float64)
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
    assert got["lo"] == pytest.approx(np.percentile(means, 2.5), rel=1e-10, abs=1e-12)
    assert got["hi"] == pytest.approx(np.percentile(means, 97.5), rel=1e-10, abs=1e-12)
    p_counts, s_counts = bootstrap_draws(n_p, n_s, draws, seed)
    assert (p_counts.sum(1) == n_p).all() and (s_counts.sum(1) == n_s).all()
    with pytest.raises(ValueError, match="prompts, seeds"):
        paired_bootstrap(np.zeros(3))


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_prompts():
    """A known effect (0.1 plus prompt and seed noise): the interval holds it and narrows with more prompts."""
    rng = np.random.default_rng(random.randrange(2**32))
    widths = []
    for n_p in (50, 800):
        d = 0.1 + rng.normal(0, 0.3, size=(n_p, 1)) + rng.normal(0, 0.01, size=(1, 5)) + rng.normal(0, 0.3, (n_p, 5))
        r = paired_bootstrap(d, draws=2000)
        assert r["lo"] < r["mean"] < r["hi"]
        widths.append(r["hi"] - r["lo"])
    assert widths[1] < widths[0] / 2


def test_cluster_bootstrap_matches_a_float64_loop_over_the_same_draws():
    """Entities of unequal size, labels in random order: each resample's mean is the mean over the drawn entities'
    prompts (every copy of an entity counted) and drawn seeds, computed here by building the resampled grid."""
    rng = np.random.default_rng(random.randrange(2**32))
    n_e, n_s, draws, seed = int(rng.integers(4, 15)), int(rng.integers(2, 6)), 300, int(rng.integers(1000))
    sizes = rng.integers(1, 6, size=n_e)
    labels = [f"e{e}" for e in range(n_e) for _ in range(sizes[e])]
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    d = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 2), size=(len(labels), n_s))
    got = paired_bootstrap(d, labels, draws=draws, seed=seed)
    first_seen = list(dict.fromkeys(labels))
    draw_rng = np.random.default_rng(seed)
    e_idx = draw_rng.integers(0, n_e, size=(draws, n_e))
    s_idx = draw_rng.integers(0, n_s, size=(draws, n_s))
    means = []
    for b in range(draws):
        rows = [i for e in e_idx[b] for i, lab in enumerate(labels) if lab == first_seen[e]]
        means.append(d[np.ix_(rows, s_idx[b])].mean())
    means = np.array(means, dtype=np.float64)
    assert got["n_clusters"] == n_e and got["n_prompts"] == len(labels) and got["n_seeds"] == n_s
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
    assert got["lo"] == pytest.approx(np.percentile(means, 2.5), rel=1e-10, abs=1e-12)
    assert got["hi"] == pytest.approx(np.percentile(means, 97.5), rel=1e-10, abs=1e-12)
    assert lower_bound(d, labels, draws=draws, seed=seed) == pytest.approx(np.percentile(means, 5.0), rel=1e-10)
    with pytest.raises(ValueError, match="cluster labels"):
        paired_bootstrap(d, labels[:-1])


def test_cluster_bootstrap_is_wider_when_prompts_share_an_entity_effect():
    """Four prompts per entity sharing a strong entity effect: resampling prompts as if independent understates
    the spread; resampling entities does not (its interval is clearly wider and still holds the truth)."""
    rng = np.random.default_rng(random.randrange(2**32))
    n_e, n_s = 60, 5
    entity = np.repeat(rng.normal(0, 0.5, size=n_e), 4)[:, None]
    d = 0.1 + entity + rng.normal(0, 0.1, size=(4 * n_e, n_s))
    labels = np.repeat(np.arange(n_e), 4).tolist()
    by_prompt = paired_bootstrap(d, draws=2000)
    by_entity = paired_bootstrap(d, labels, draws=2000)
    assert (by_entity["hi"] - by_entity["lo"]) > 1.5 * (by_prompt["hi"] - by_prompt["lo"])
    assert by_entity["lo"] < by_entity["mean"] < by_entity["hi"]


def test_seed_t_interval_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(random.randrange(2**32))
    for n_s in (2, 5, 11):
        d = rng.normal(rng.uniform(-1, 1), 1.0, size=(int(rng.integers(3, 30)), n_s))
        per_seed = d.mean(axis=0)
        lo, hi = stats.t.interval(0.95, n_s - 1, loc=per_seed.mean(), scale=stats.sem(per_seed))
        got = seed_t_interval(d)
        # the quantiles are tabled to 4 decimals: compare on the interval's own scale (an end near 0 made a
        # relative check on the end itself fail now and then)
        half = (hi - lo) / 2
        assert abs(got["lo"] - lo) <= 1e-4 * half and abs(got["hi"] - hi) <= 1e-4 * half
        assert paired_bootstrap(d, draws=200)["t"] == got
    assert seed_t_interval(np.ones((4, 1))) is None  # one seed: no spread


def test_shuffled_accuracy_is_the_mean_over_every_shuffle_within_an_attribute():
    """Exact: every permutation of the given answers among the prompts of the same attribute, averaged; a fixed
    answer per attribute scores its own accuracy (so it never clears its bar), and the bar is at least 1/6."""
    import itertools

    rng = random.Random(random.randrange(2**32))
    values = ["a", "b", "c", "d", "e", "f"]
    attrs = ["color"] * rng.randrange(2, 6) + ["food"] * rng.randrange(2, 6)
    answers = [rng.choice(values) for _ in attrs]
    given = [rng.choice(values + [None]) for _ in attrs]
    rows = {a: [i for i, x in enumerate(attrs) if x == a] for a in ("color", "food")}
    accs = []
    for pc in itertools.permutations(rows["color"]):
        for pf in itertools.permutations(rows["food"]):
            perm = dict(zip(rows["color"], pc, strict=True)) | dict(zip(rows["food"], pf, strict=True))
            accs.append(np.mean([given[perm[i]] == answers[i] for i in range(len(attrs))]))
    assert shuffled_accuracy(given, attrs, answers) == pytest.approx(np.mean(accs), rel=1e-12)
    fixed = {"color": rng.choice(values), "food": rng.choice(values)}
    constant = [fixed[a] for a in attrs]
    own = np.mean([c == t for c, t in zip(constant, answers, strict=True)])
    assert shuffled_accuracy(constant, attrs, answers) == pytest.approx(own)
    assert chance_bar([constant, constant], attrs, answers) == pytest.approx(max(1 / 6, own))
    assert chance_bar([[None] * len(attrs)], attrs, answers) == pytest.approx(1 / 6)  # never below 1/6


def test_verdict_rule():
    assert verdict("beats", 0.01, 0.2) == "confirmed"
    assert verdict("beats", -0.01, 0.2) == "inconclusive"
    assert verdict("beats", -0.2, -0.01) == "refuted"
    assert verdict("matches", -MATCH_MARGIN + 0.001, 0.1) == "confirmed"
    assert verdict("matches", -0.1, 0.0) == "inconclusive"
    assert verdict("matches", -0.2, -MATCH_MARGIN - 0.001) == "refuted"
    assert verdict("keeps", -KEEP_MARGIN + 0.001, 0.0) == "confirmed"
    assert verdict("keeps", -KEEP_MARGIN - 0.01, 0.0) == "inconclusive"
    assert verdict("keeps", -0.3, -KEEP_MARGIN - 0.001) == "refuted"
    # nothing above chance on either side: untestable, whatever the interval
    assert verdict("beats", 0.1, 0.2, testable=False) == "untestable"
    # a method at chance does not beat or match anything, even with the interval above the bar
    assert verdict("beats", 0.01, 0.2, competent=False) == "inconclusive"
    assert verdict("matches", 0.01, 0.2, competent=False) == "inconclusive"
    assert verdict("beats", -0.2, -0.01, competent=False) == "refuted"
    with pytest.raises(ValueError, match="claim kind"):
        verdict("wins", 0.0, 1.0)


def _world_scores(rng, accuracy: dict[str, dict[str, float]], n_e: int = 30) -> tuple[dict, list]:
    """Synthetic per-prompt sw scores (4 prompts per entity, alternate entities `known` and `transfer`): label →
    part → P(correct); answers drawn uniformly from six values, a wrong answer a uniformly drawn other value.
    Returns (scores, prompts)."""
    from clo_fast.data.world import ATTRIBUTES

    prompts = []
    for e in range(n_e):
        for attr, spec in ATTRIBUTES.items():
            prompts.append(
                {"id": f"E{e}-{attr}", "lang": "sw", "entity": f"E{e}", "part": ("known", "transfer")[e % 2],
                 "attribute": attr, "answer": rng.choice(sorted(spec["values"]))}
            )  # fmt: skip
    models, given = {}, {}
    for label, p in accuracy.items():
        named = []
        for it in prompts:
            others = [v for v in sorted(ATTRIBUTES[it["attribute"]]["values"]) if v != it["answer"]]
            named.append(it["answer"] if rng.random() < p[it["part"]] else rng.choice(others))
        hits = [int(v == it["answer"]) for v, it in zip(named, prompts, strict=True)]
        models[label] = {"sw": {"correct_in_lang": hits}}
        given[label] = {"sw": named}
    scores = {"ids": {"sw": [it["id"] for it in prompts]}, "scores": ["correct_in_lang"], "models": models}
    return {**scores, "given": given}, prompts


def test_claims_are_decided_per_part_with_the_chance_gate():
    """Known entities: CLO well above SFT, both above chance → confirmed. Transfer entities: both at chance (1/6)
    → untestable, never inconclusive or confirmed."""
    from clo_fast.evaluate.comparison import prompt_units

    rng = random.Random(random.randrange(2**32))
    acc = {f"clo/s{s}": {"known": 0.85, "transfer": 0.0} for s in range(3)}
    acc |= {f"sft/s{s}": {"known": 0.45, "transfer": 0.0} for s in range(3)}
    scores, prompts = _world_scores(rng, acc)
    units = prompt_units(scores, prompts)
    assert set(units["parts"]["sw"]) == {"known", "transfer"} and len(set(units["clusters"]["sw"])) == 30
    groups = {"sft": [f"sft/s{s}" for s in range(3)], "clo": [f"clo/s{s}" for s in range(3)]}
    claims = [
        ("k", "beats, known", "clo", "sft", "tgt", "known", "beats"),
        ("t", "beats, transfer", "clo", "sft", "tgt", "transfer", "beats"),
        ("x", "not run", "clo-frac0.5", "sft", "tgt", "known", "matches"),
    ]
    got = {c["id"]: c for c in claim_verdicts(scores, groups, claims, "sw", units)}
    assert got["k"]["verdict"] == "confirmed" and got["k"]["part"] == "known"
    assert got["k"]["n_clusters"] == 15 and got["k"]["n_prompts"] == 60 and got["k"]["t"]["lo"] > 0
    assert got["t"]["verdict"] == "untestable"
    assert not got["t"]["method_gate"]["above"] and not got["t"]["versus_gate"]["above"]
    assert got["x"]["verdict"] == "not run"


def test_a_degenerate_answer_is_not_above_chance():
    """One fixed answer per attribute for every entity, the luckiest such answer (each attribute's most frequent
    value, well above 1/6 on a few entities): not above chance, so its 'beats' over a model that is always wrong
    is untestable, not confirmed. The same data with real answers (right 60% of the time) is above chance."""
    from clo_fast.evaluate.comparison import prompt_units

    rng = random.Random(random.randrange(2**32))
    acc = {"sft/s0": {"known": 0.0, "transfer": 0.0}, "sft/s1": {"known": 0.0, "transfer": 0.0}}
    acc |= {"good/s0": {"known": 0.6, "transfer": 0.6}, "good/s1": {"known": 0.6, "transfer": 0.6}}
    scores, prompts = _world_scores(rng, acc, n_e=12)
    best = {}
    for attr in {it["attribute"] for it in prompts}:
        answers = [it["answer"] for it in prompts if it["attribute"] == attr]
        best[attr] = max(sorted(set(answers)), key=answers.count)
    fixed = [best[it["attribute"]] for it in prompts]
    for s in range(2):
        hits = [int(v == it["answer"]) for v, it in zip(fixed, prompts, strict=True)]
        scores["models"][f"clo/s{s}"] = {"sw": {"correct_in_lang": hits}}
        scores["given"][f"clo/s{s}"] = {"sw": fixed}
    units = prompt_units(scores, prompts)
    groups = {"sft": ["sft/s0", "sft/s1"], "clo": ["clo/s0", "clo/s1"], "good": ["good/s0", "good/s1"]}
    gates = competence(scores, groups, units)
    degenerate = gates["clo"]["correct_in_lang/sw"]
    assert degenerate["mean"] > 1 / 6 and degenerate["chance"] == pytest.approx(degenerate["mean"])
    assert not degenerate["above"] and gates["good"]["correct_in_lang/sw"]["above"]
    claim = [("1", "beats", "clo", "sft", "tgt", None, "beats")]
    (c,) = claim_verdicts(scores, groups, claim, "sw", units, gates)
    assert c["lo"] > 0 and c["verdict"] == "untestable"  # the interval is above 0, and that says nothing


def test_selection_rule_and_grids():
    from clo_fast.evaluate.selection import choose, setting_value

    rng = np.random.default_rng(random.randrange(2**32))
    per_seed = [{"en": float(rng.random()), "sw": float(rng.random())} for _ in range(3)]
    assert setting_value(per_seed, "sw") == pytest.approx(np.mean([(x["en"] + x["sw"]) / 2 for x in per_seed]))
    vals = rng.random(7).tolist()
    assert choose(vals) == int(np.argmax(vals))
    assert choose([0.2, 0.5, 0.5, 0.1]) == 1  # a tie goes to the first in grid order
    cfg = load_config(DEMO)
    plan = {m.name: m for m in plan_methods(cfg, ["sft", "clo"], [], [], [0.5], n_pairs=10)}
    assert plan["clo-frac0.5"].inherit == "clo" and plan["sft"].inherit is None
    for grid, spec in SEARCH_GRIDS.items():
        sft, clo = grid_settings(plan["sft"], grid), grid_settings(plan["clo"], grid)
        lrs = {o for _, ovr in sft for o in ovr}
        assert lrs == {f"optim.lr={lr!r}" for lr in spec["lr"]}  # the same learning rates for every method
        assert {o for _, ovr in clo for o in ovr if o.startswith("optim.lr")} == lrs
        assert len(clo) == len(spec["lr"]) * len(spec["preference"]) and len({sid for sid, _ in clo}) == len(clo)


def test_compare_refuses_search_seeds_that_are_test_seeds(tmp_path):
    from clo_fast.compare import main

    world = ROOT / "configs" / "world.yaml"
    with pytest.raises(ConfigError, match="--search-seeds"):
        main(["--config", str(world), "--seeds", "0", "1", "--search-seeds", "1", "7", "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="--set optim.lr"):
        main(["--config", str(world), "--set", "optim.lr=0.1", "--out-dir", str(tmp_path / "c")])
    with pytest.raises(ConfigError, match="--search"):
        main(["--config", str(DEMO), "--search", "small", "--out-dir", str(tmp_path / "d")])


def _scores(values: dict[str, np.ndarray]) -> dict:
    """Per-prompt scores as prompt_scores writes them: label → {"sw": {"correct_in_lang": [...]}}."""
    n = len(next(iter(values.values())))
    return {
        "ids": {"sw": [f"q{i}" for i in range(n)]},
        "scores": ["correct_in_lang"],
        "models": {label: {"sw": {"correct_in_lang": v.astype(int).tolist()}} for label, v in values.items()},
    }


def test_sign_control_swapping_sides_reverses_the_effect_and_the_verdict():
    """Sign control on the statistics path: A better than B gives a positive interval and 'confirmed'; the same
    data with A and B swapped gives the mirrored interval and 'refuted'."""
    rng = np.random.default_rng(random.randrange(2**32))
    a = {f"clo/s{s}": rng.random(300) < 0.7 for s in range(3)}
    b = {f"sft/s{s}": rng.random(300) < 0.3 for s in range(3)}
    groups = {"sft": list(b), "clo": list(a)}
    fwd = differences(_scores({**a, **b}), groups, "sft")["clo"]["correct_in_lang/sw"]
    swapped = {f"clo/s{s}": b[f"sft/s{s}"] for s in range(3)} | {f"sft/s{s}": a[f"clo/s{s}"] for s in range(3)}
    rev = differences(_scores(swapped), groups, "sft")["clo"]["correct_in_lang/sw"]
    assert fwd["lo"] > 0 and rev["hi"] < 0
    assert rev["mean"] == pytest.approx(-fwd["mean"]) and rev["lo"] == pytest.approx(-fwd["hi"])
    claim = [("1", "CLO beats SFT in the target language", "clo", "sft", "tgt", None, "beats")]
    assert claim_verdicts(_scores({**a, **b}), groups, claim, "sw")[0]["verdict"] == "confirmed"
    assert claim_verdicts(_scores(swapped), groups, claim, "sw")[0]["verdict"] == "refuted"
    assert claim_verdicts(_scores(a), {"clo": list(a)}, claim, "sw")[0]["verdict"] == "not run"


def test_sign_control_swapping_chosen_and_rejected_reverses_the_preference_gradient():
    """Sign control on the loss path: the preference term pushes each direction's chosen response up and the
    rejected one down; with chosen and rejected swapped, the same responses are pushed the other way."""
    import torch

    from clo_fast.loss import clo_loss

    g = torch.Generator().manual_seed(random.randrange(2**31))
    logps = -torch.rand(6, 4, generator=g, dtype=torch.float64) * 20
    ref = logps.detach() - torch.rand(6, 4, generator=g, dtype=torch.float64)
    tokens = torch.randint(3, 9, (6, 4), generator=g)
    swap = [1, 0, 3, 2]  # chosen ↔ rejected in both directions

    def grad(policy, reference):
        p = policy.clone().requires_grad_(True)
        loss, _ = clo_loss(p, reference, tokens, beta=0.1, lam=0.0)
        loss.backward()
        return p.grad

    g_fwd = grad(logps, ref)
    g_rev = grad(logps[:, swap], ref[:, swap])[:, swap]  # back in the original responses' order
    assert (g_fwd[:, [0, 2]] < 0).all() and (g_fwd[:, [1, 3]] > 0).all()  # descent raises chosen, lowers rejected
    assert (g_rev[:, [0, 2]] > 0).all() and (g_rev[:, [1, 3]] < 0).all()


def test_claims_are_the_papers_three():
    assert [c[0][0] for c in CLAIMS] == ["1", "1", "2", "2", "3", "3"]
    by_id = {c[0]: c for c in CLAIMS}
    assert by_id["1-known"][2:] == ("clo", "sft", "tgt", "known", "beats")
    assert by_id["1-transfer"][2:] == ("clo", "sft", "tgt", "transfer", "beats")
    assert by_id["2"][2:] == ("clo", "base", "en", None, "keeps")  # keeps English: non-inferior to the base
    assert by_id["3-transfer"][2:] == ("clo-frac0.5", "sft", "tgt", "transfer", "matches")


def _fake_report(models: dict[str, float]) -> dict:
    langs = ["en", "sw"]
    return {
        "languages": langs,
        "models": {
            label: {
                "metrics": {
                    lang: {"fidelity": v, "chrf": 10 * v + (lang == "sw"), "nll_per_token": 6 - v} for lang in langs
                }
            }
            for label, v in models.items()
        },
    }


def test_aggregate_groups_seeds_and_renders_every_metric():
    report = _fake_report({"base": 0.0, "a/s0": 0.5, "a/s1": 0.7, "b/s0": 0.1, "b/s1": 0.1})
    summary = aggregate(report, {"base": ["base"], "a": ["a/s0", "a/s1"], "b": ["b/s0", "b/s1"]})
    assert set(summary["a"]) == set(metric_names(["en", "sw"])) and len(summary["a"]) == len(METRICS) * 2
    assert summary["a"]["fidelity/en"]["mean"] == pytest.approx(0.6)
    assert summary["a"]["chrf/sw"]["values"] == [6.0, 8.0]
    assert summary["b"]["nll_per_token/en"]["std"] == 0.0
    with pytest.raises(KeyError, match="not in the evaluation report"):
        aggregate(report, {"c": ["c/s0"]})
    comp = {
        "languages": ["en", "sw"],
        "n_prompts": {"en": 3, "sw": 3},
        "seeds": [0, 1],
        "seconds": 60.0,
        "reference_method": "a",
        "base": summary["base"],
        "methods": {m: {"title": m.upper(), "short": m, "metrics": summary[m]} for m in ("a", "b")},
    }
    md = render_comparison_markdown(comp)
    assert "| fidelity en (↑) | 0.000 | 0.600 ± 0.141 | 0.100 ± 0.000 |" in md
    assert "accuracy" not in md  # no per-prompt answers: no accuracy rows


def test_plan_methods_dedupes_and_checks():
    cfg = load_config(DEMO)
    names = [m.name for m in plan_methods(cfg, ["sft", "dpo", "clo"], [0.5, 0.25], ["attention", "mlp"])]
    # λ=0.5 and attention-only are the config's own CLO run: trained once
    assert names == ["sft", "dpo", "clo", "clo-lam0.25", "clo-mlp"]
    plan = plan_methods(cfg, ["dpo", "clo", "sft_target"], [], [], [0.5], n_pairs=101)
    assert [m.name for m in plan] == ["sft", "dpo", "clo", "sft_target", "clo-frac0.5"]  # SFT → DPO needs SFT
    by_name = {m.name: m for m in plan}
    assert "clo.sft_sequences=[0, 2]" in by_name["sft"].overrides  # the paper's SFT: both languages
    assert "clo.sft_sequences=[2]" in by_name["sft_target"].overrides
    assert by_name["dpo"].init_from == "sft" and "clo.mode=dpo" in by_name["dpo"].overrides
    assert "data.max_examples=50" in by_name["clo-frac0.5"].overrides  # round(0.5 × 101), half to even
    with pytest.raises(ConfigError, match="--fractions"):
        plan_methods(cfg, ["clo"], [], [], [1.0], n_pairs=10)
    mlp = plan_methods(cfg, [], [], ["mlp"])[0]
    patterns = json.loads(next(o for o in mlp.overrides if o.startswith("model.trainable_patterns=")).split("=", 1)[1])
    assert patterns and all("mlp" in p for p in patterns)
    with pytest.raises(ConfigError, match="--lams"):
        plan_methods(cfg, ["clo"], [1.5], [])
    lora = load_config(DEMO, ["model.lora={r: 4}"])
    with pytest.raises(ConfigError, match="model.lora"):
        plan_methods(lora, ["clo"], [], ["all"])


def test_compare_refuses_a_set_it_controls(tmp_path):
    from clo_fast.compare import main

    assert "optim.seed" in CONTROLLED
    with pytest.raises(ConfigError, match="--set optim.seed=3"):
        main(["--config", str(DEMO), "--set", "optim.seed=3", "--out-dir", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_chrf_wiring():
    assert corpus_chrf(["habari ya asubuhi"], ["habari ya asubuhi"]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    items = [
        {"lang": "sw", "prompt": "Salamu ya asubuhi?", "reference": "habari ya asubuhi"},
        {"lang": "sw", "prompt": "Sema kitu", "reference": None},  # not scored
        {"lang": "en", "prompt": "Say something", "reference": None},
    ]
    gens = [{"text": "habari za asubuhi", "tokens": 3, "finished": True}] + [
        {"text": "x", "tokens": 1, "finished": True}
    ] * 2
    m = response_metrics(items, gens, ["sw", "sw", "en"])
    assert m["sw"]["chrf"] == pytest.approx(corpus_chrf(["habari za asubuhi"], ["habari ya asubuhi"]))
    assert 0 < m["sw"]["chrf"] < 100 and m["sw"]["chrf_prompts"] == 1
    assert m["en"]["chrf"] is None and m["en"]["chrf_prompts"] == 0


def test_reference_dir_is_where_reference_logps_are_cached(tmp_path):
    from clo_fast.training.reference import reference_root

    cfg = load_config(DEMO, [f"train.output_dir={tmp_path / 'run'}"])
    assert reference_root(cfg) == tmp_path / "run" / "ref_data"
    cfg = load_config(DEMO, [f"train.reference_dir={tmp_path / 'shared'}"])
    assert reference_root(cfg) == tmp_path / "shared"


WORLD_SMALL = ROOT / "docs" / "compare" / "world-small"  # the comparison's small version, run by the test below
# The small version of `python -m clo_fast.compare --config configs/world.yaml`: the world's base pretrained 300 steps
# instead of 1500, the small settings grid on one search seed, SFT and CLO (not CLO on half the pairs: CPU time) for
# one epoch, test seeds 0 and 1, 60 questions per language (15 entities of each split). Its compare.json is committed
# (docs/compare/world-small/) and must come back bit for bit: the whole pipeline (world, base, search, selection,
# runs, evaluation, bootstrap, gates, verdicts) reproduces under the pinned CPU numerics.
WORLD_SMALL_STEPS = 300
WORLD_SMALL_ARGS = ["--methods", "sft", "clo", "--fractions", "--search", "small", "--search-seeds", "100", "--seeds",
                    "0", "1", "--set", "optim.epochs=1", "--set", "eval.max_prompts=60"]  # fmt: skip


def world_small_command(tmp: Path) -> tuple[list[str], list[str]]:
    """(the base's build command, the comparison command) of the small version, writing under `tmp`."""
    build = [sys.executable, "-m", "clo_fast.world", "--pretrain-steps", str(WORLD_SMALL_STEPS), "--cache-dir",
             str(tmp / "cache")]  # fmt: skip
    compare = [sys.executable, "-m", "clo_fast.compare", "--config", "configs/world.yaml", *WORLD_SMALL_ARGS,
               "--out-dir", str(tmp / "cmp"), "--set", f"data.cache_dir={tmp / 'cache'}",
               "--set", f"data.output_dir={tmp / 'data'}"]  # fmt: skip
    return build, compare


@pytest.mark.slow
def test_world_comparison_small_version_reproduces_and_reuses_its_runs(tmp_path):
    """The small version end to end: the files, each seed's values as evaluated, one reference pass shared by the
    CLO runs, the committed result bit for bit, a second start reusing the finished runs, and other settings
    refused."""
    from helpers import require_locked_versions

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    build, cmd = world_small_command(tmp_path)
    b = subprocess.run(build, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    cmd += ["--set", f"model.name_or_path={Path(b.stdout.strip().splitlines()[-1]) / 'base'}"]
    out = tmp_path / "cmp"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    comp = json.loads((out / "compare.json").read_text())
    report = json.loads((out / "eval" / "report.json").read_text())
    assert (out / "compare.md").is_file() and (out / "compare.png").stat().st_size > 0
    assert (out / "search.png").stat().st_size > 0 and (out / "search.json").is_file()
    assert list(comp["methods"]) == ["sft", "clo"] and comp["seeds"] == [0, 1]
    assert comp["n_prompts"] == {"en": 60, "sw": 60} and [c["id"] for c in comp["claims"]] == [c[0] for c in CLAIMS]
    # the search: each method's grid on the search seed, one setting chosen; the test runs use it, CLO's variant too
    search = comp["search"]
    assert search["seeds"] == [100] and set(search["methods"]) == {"sft", "clo"}
    for name in ("sft", "clo"):
        info = search["methods"][name]
        assert [r["id"] for r in info["settings"]] == [sid for sid, _ in grid_settings(plan_methods(
            load_config("configs/world.yaml"), [name], [], [])[0], "small")]  # fmt: skip
        assert comp["methods"][name]["setting"] == info["chosen_overrides"]
    assert [c["verdict"] for c in comp["claims"] if c["method"] == "clo-frac0.5"] == ["not run", "not run"]
    # the test set: both parts, clustered by entity (4 questions each)
    assert set(comp["scores"]["parts"]["sw"]) == {"known", "transfer"}
    assert all(c["n_clusters"] * 4 == c["n_prompts"] for c in comp["claims"] if "n_clusters" in c)
    for method, info in comp["methods"].items():
        for metric in metric_names(comp["languages"]):
            key, lang = metric.split("/")
            values = info["metrics"][metric]["values"]
            assert len(values) == 2 and None not in values  # the world's test set carries answers: accuracy too
            if key in report["models"][f"{method}/s0"]["metrics"][lang]:  # accuracy: compare's, from the scores
                assert values == [report["models"][f"{method}/s{s}"]["metrics"][lang][key] for s in (0, 1)]
    # the CLO runs of one dataset share one reference cache: computed by the first (the search's), reused after
    first = search["methods"]["clo"]["settings"][0]["id"]
    assert "reusing" not in (out / "search" / "runs" / f"clo-{first}-s100" / "train.log").read_text()
    assert "reusing" in (out / "runs" / "clo-s0" / "train.log").read_text()
    assert "reusing" in (out / "runs" / "clo-s1" / "train.log").read_text()
    assert marked_kind(out / "ref_data") == "reference_cache"
    # the committed result, bit for bit (under the library versions the README states)
    require_locked_versions()
    committed = json.loads((WORLD_SMALL / "compare.json").read_text(encoding="utf-8"))
    for method, info in committed["methods"].items():
        for metric, summary in info["metrics"].items():
            assert comp["methods"][method]["metrics"][metric]["values"] == summary["values"], (method, metric)
    assert comp["base"] == committed["base"] and comp["claims"] == committed["claims"]
    assert comp["search"] == committed["search"]
    # started again: the finished runs are reused (no new training output), the result is the same
    sizes = {p: p.stat().st_size for p in (out / "runs").glob("*/train.log")}
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert {p: p.stat().st_size for p in (out / "runs").glob("*/train.log")} == sizes
    again = json.loads((out / "compare.json").read_text())
    assert again["methods"]["clo"]["metrics"] == comp["methods"]["clo"]["metrics"]
    # other settings into the same folder: refused, naming the run folder
    r3 = subprocess.run(cmd + ["--set", "optim.warmup_steps=3"], capture_output=True, text=True, env=env, cwd=ROOT,
                        stdin=subprocess.DEVNULL)  # fmt: skip
    assert r3.returncode == 2 and "holds a run started with other settings" in r3.stderr


@pytest.mark.slow
def test_compare_resumes_an_interrupted_run(tmp_path):
    """A run killed mid-training (SIGKILL after step 3, checkpoint at step 2) stops the comparison with its log
    named; started again, compare resumes that run from its checkpoint instead of starting over."""
    from helpers import fault_env

    out = tmp_path / "cmp"
    cmd = [
        sys.executable, "-m", "clo_fast.compare", "--config", str(DEMO), "--methods", "clo", "--fractions",
        "--seeds", "0", "--out-dir", str(out), "--set", "optim.max_steps=4", "--set", "train.save_steps=2",
        "--set", f"data.output_dir={tmp_path / 'data'}", "--set", "eval.max_prompts=2",
        "--set", "eval.max_new_tokens=4",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    crashed = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, **fault_env("kill_after_step", 3)}, cwd=ROOT
    )
    assert crashed.returncode == 2 and "training run clo-s0 failed" in crashed.stderr
    assert "clo-s0/train.log" in crashed.stderr and not (out / "compare.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (out / "runs" / "clo-s0" / "train.log").read_text()
    assert "resumed from" in log and "step_00000002" in log.split("resumed from")[1].splitlines()[0]
    marker = json.loads((out / "runs" / "clo-s0" / "compare_run.json").read_text())
    assert marker["finished"] and marker["final_metrics"]


def test_train_command_with_and_without_a_launcher():
    from clo_fast.compare import TRAIN_SCRIPT, train_command

    plain = train_command(None, DEMO, ["clo.mode=sft", "optim.seed=1"])
    assert plain == [sys.executable, str(TRAIN_SCRIPT), "--config", str(DEMO)] + [
        "--set", "clo.mode=sft", "--set", "optim.seed=1",
    ]  # fmt: skip
    launched = train_command("deepspeed --num_gpus 8", DEMO, ["clo.mode=sft"])
    assert launched[:3] == ["deepspeed", "--num_gpus", "8"] and launched[3:] == plain[1:5] + ["clo.mode=sft"]


WORLD_FULL = ROOT / "docs" / "compare" / "world"  # `python -m clo_fast.compare --config configs/world.yaml`


def test_readme_world_table_is_the_committed_world_comparison():
    """The README's world table, intervals and verdicts are the committed compare.md of the full command; while that
    run is pending (not committed), the README says so and states no verdict of the world comparison."""
    from helpers import README, table_rows

    readme = README.read_text(encoding="utf-8")
    section = readme[readme.index("### Does CLO beat SFT?") :]
    section = section[: section.index("\n### ")]
    if not (WORLD_FULL / "compare.json").is_file():
        assert "full run pending" in section
        assert not any(f"**{v}**" in section for v in ("confirmed", "refuted", "inconclusive"))
        return
    md = (WORLD_FULL / "compare.md").read_text(encoding="utf-8")
    comp = json.loads((WORLD_FULL / "compare.json").read_text(encoding="utf-8"))
    header = next(line for line in md.splitlines() if line.startswith("| metric | base |"))
    block = readme[readme.index(header) :]
    assert table_rows(block[: block.index("\n\n")]) == table_rows(md[md.index(header) :].split("\n\n")[0])
    for c in comp["claims"]:
        assert f"({c['id']}) {c['claim']}: **{c['verdict']}**" in readme
        if "lo" in c:
            assert f"[{c['lo']:+.3f}, {c['hi']:+.3f}]" in readme
    assert comp["seeds"] == [0, 1, 2, 3, 4] and comp["overrides"] == [] and comp["config"].endswith("world.yaml")
    assert comp["search"]["grid"] == "full" and comp["search"]["seeds"] == [100, 101]
