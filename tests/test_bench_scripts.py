"""benchmarks/bench_step.py and benchmarks/bench_head.py: every shape and every variant / path they offer runs (a
few steps, one layer) so a refactor cannot break one unseen; their functions stay short (issue #32)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _module(name: str):
    """A benchmark script as a module (it imports its harness, benchmarks/common.py, as a sibling)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # registered before it runs, as an import does (its dataclass looks itself up)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench_step = _module("bench_step")
common = sys.modules["common"]


def _run(tmp_path, script: str, args: list[str]) -> dict:
    """The script on the CPU in its own process, its JSON read back."""
    out = tmp_path / f"{script}.json"
    # conftest turns on Triton's interpreter for the kernel tests; a benchmark times the path users run (torch)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(BENCH / f"{script}.py"), *args, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def _bench_step(tmp_path, shape: str, variants, profiles=("demo",)) -> dict:
    args = ["--shape", shape, "--device", "cpu", "--num-layers", "1", "--steps", "1", "--warmup", "0",
            "--examples", "2", "--variants", ",".join(variants), "--profiles", ",".join(profiles)]  # fmt: skip
    return _run(tmp_path, "bench_step", args)


@pytest.mark.slow
def test_every_bench_step_variant_runs_on_every_profile(tmp_path):
    """Every variant of the table, one step at the smallest shape, on every length profile; trl_liger is recorded
    as needing CUDA. Our modes agree on the first loss (they are exact)."""
    profiles = tuple(common.LENGTH_PROFILES)
    report = _bench_step(tmp_path, "tiny", bench_step.VARIANTS, profiles)
    on_cpu = sorted(v for v, spec in bench_step.VARIANTS.items() if not spec.needs_cuda)
    assert set(report["errors"]) == {"trl_liger"} and "CUDA" in report["errors"]["trl_liger"]
    for profile in profiles:
        res = report["results"][profile]
        assert sorted(res) == on_cpu, report["errors"]
        assert all(r["micro_batches"] >= 1 and r["step_ms"] > 0 and "step_cpu_ms" in r for r in res.values())
        assert report["summary"][profile]["our_modes_first_loss_max_abs_diff"] < 1e-4
    assert set(report["paired_round_ratios"]) == set(profiles)


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(set(bench_step.SHAPES) - {"tiny"}))  # tiny: the test above
def test_every_bench_step_shape_runs(shape, tmp_path):
    """Every shape (its widths and head, one layer) through one step of our padded layout (`none`): a shape whose
    fields clash with the harness (the demo's did) fails here."""
    report = _bench_step(tmp_path, shape, ["none"])
    assert list(report["results"]["demo"]) == ["none"] and not report["errors"]
    assert report["model"]["num_hidden_layers"] == 1
    assert report["model"]["vocab_size"] == bench_step.SHAPES[shape]["vocab_size"]


@pytest.mark.slow
def test_every_bench_head_cpu_shape_and_path_runs(tmp_path):
    """bench_head on the CPU: every CPU shape, both heads, every path available here (`--paths all`), timed and
    checked for accuracy. (The GPU shapes run the same code at sizes only a GPU holds.)"""
    bench_head = _module("bench_head")
    paths = sorted(bench_head.available_paths(gpu=False))
    report = _run(tmp_path, "bench_head", ["--device", "cpu", "--examples", "1", "--reps", "1", "--paths", "all",
                                           "--profile", "demo"])  # fmt: skip
    rows = {(r["shape"], r["head"]): r for r in report["rows"]}
    assert sorted(rows) == sorted((s, h) for s in bench_head.CPU_SHAPES for h in ("frozen", "trainable"))
    for row in rows.values():
        assert sorted(row["ms"]) == paths and not row["errors"], row["errors"]
        assert all("error" not in a for a in row["accuracy"].values()), row["accuracy"]


def test_variant_table_decides_each_variant_once():
    """One record per variant: a setup function and the layout it is built in; PACKED follows from the table."""
    assert all(callable(spec.setup) for spec in bench_step.VARIANTS.values())
    assert bench_step.PACKED == ("padding_free", "prefix_shared")
    assert {v for v, spec in bench_step.VARIANTS.items() if spec.peer} == {"trl_liger", "materialized_logits"}
