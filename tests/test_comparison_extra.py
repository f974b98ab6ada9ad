"""compare's benchmark and judge rows (clo_fast.evaluate.comparison_extra), on a synthetic evaluation report."""

from pathlib import Path

import pytest

from clo_fast.evaluate.comparison import aggregate, render_comparison_markdown
from clo_fast.evaluate.comparison_extra import aggregate_extra, compare_judge_pairs, extra_rows

ACC = {"base": 0.3, "sft/s0": 0.4, "sft/s1": 0.6, "clo/s0": 0.5, "clo/s1": 0.5}
WIN = {"clo/s0": 0.6, "clo/s1": 0.7}  # against sft/s0 and sft/s1


def fake_report() -> dict:
    langs = ["en", "sw"]
    models = {
        label: {
            "metrics": {lang: {"fidelity": 0.5, "chrf": 1.0, "nll_per_token": 2.0} for lang in langs},
            "benchmarks": {
                "demo_mc_sw": {"lang": "sw", "acc": acc, "acc_stderr": 0.15},
                "mmlu": {"lang": "en", "acc": acc / 2, "acc_stderr": 0.01},
                "_settings": {"chat_template": False},
            },
        }
        for label, acc in ACC.items()
    }
    results = {
        cand: {
            f"sft/s{cand[-1]}": {lang: {"win_rate": w + (lang == "sw") * 0.1, "lc_win_rate": w - 0.1} for lang in langs}
        }
        for cand, w in WIN.items()
    }
    pairs = [[c, f"sft/s{c[-1]}"] for c in WIN]
    return {"languages": langs, "models": models, "judge": {"pairs": pairs, "results": results}}


def test_compare_judge_pairs_are_seed_by_seed_against_sft():
    assert compare_judge_pairs(["sft", "dpo", "clo"], [0, 1]) == [
        ("dpo/s0", "sft/s0"),
        ("dpo/s1", "sft/s1"),
        ("clo/s0", "sft/s0"),
        ("clo/s1", "sft/s1"),
    ]
    assert compare_judge_pairs(["dpo", "clo"], [0]) is None  # no SFT run: the evaluator's default baseline


def test_benchmark_and_judge_rows_for_every_method():
    report = fake_report()
    groups = {"base": ["base"], "sft": ["sft/s0", "sft/s1"], "clo": ["clo/s0", "clo/s1"]}
    extra = aggregate_extra(report, groups)
    assert extra["benchmarks"]["demo_mc_sw"]["groups"]["sft"]["mean"] == pytest.approx(0.5)
    assert extra["judge"]["rows"]["win_rate/sw"]["clo"]["values"] == pytest.approx([0.7, 0.8])
    assert set(extra["judge"]["rows"]["win_rate/sw"]) == {"clo"}  # base and SFT are not judged against SFT

    summary = aggregate(report, groups)
    comp = {
        "languages": ["en", "sw"],
        "n_prompts": {"en": 3, "sw": 3},
        "seeds": [0, 1],
        "seconds": 60.0,
        "reference_method": "clo",
        "base": summary["base"],
        "methods": {m: {"title": m.upper(), "short": m, "metrics": summary[m]} for m in ("sft", "clo")},
        "extra": extra,
        "judge_versus": "SFT",
    }
    md = render_comparison_markdown(comp)
    # std over seeds: sft 0.4, 0.6 → 0.141; clo 0.5, 0.5 → 0
    assert "| demo_mc_sw (sw) accuracy (↑) | 0.300 | 0.500 ± 0.141 | 0.500 ± 0.000 |" in md
    assert "| mmlu (en) accuracy (↑) | 0.150 | 0.250 ± 0.071 | 0.250 ± 0.000 |" in md
    assert "| judge win rate vs SFT sw (↑) | – | – | 0.750 ± 0.071 |" in md
    assert "| length-controlled win rate vs SFT en (↑) | – | – | 0.550 ± 0.071 |" in md
    # the rows sit inside the table, before the noise summary
    table = md.split("\n\n")[1]
    assert "demo_mc_sw (sw) accuracy" in table and "judge win rate vs SFT en" in table
    assert extra_rows({}, ["sft"]) == []  # no benchmarks, no judge: nothing added


def test_compare_checks_the_judge_before_training(tmp_path, monkeypatch):
    import socket

    from clo_fast import compare
    from clo_fast.config import ConfigError

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: pytest.fail("a run was trained"))
    out = tmp_path / "cmp"
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    argv = ["--config", str(demo), "--seeds", "0", "--out-dir", str(out)]
    argv += ["--set", f"eval.judge_endpoint=http://127.0.0.1:{port}/v1", "--set", "eval.judge_max_retries=0"]
    with pytest.raises(ConfigError, match=r"eval\.judge_endpoint .*did not answer"):
        compare.main(argv)
    assert not out.exists()  # nothing claimed, nothing written
