"""benchmarks/gpu_check.sh: the prepared GPU check, run dry on the CPU (the same steps, tiny shapes, the same
files), so that a script bug costs no GPU minute; and its budget and stop rules."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/gpu_check.py)

ORDER = ["imports", "bench_head", "tma_ab", "bench_step", "gpu_tests", "gpu_smoke"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def test_step_order_is_the_issues():
    """Most valuable first: imports, the head benchmark, the TMA A/B, the step benchmark, the tests, the smoke."""
    assert list(gpu_check.STEPS) == ORDER
    assert set(gpu_check.STEP_CAPS) == set(ORDER)


def test_a_step_gets_at_most_what_is_left_of_the_budget(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_CHECK_T0", raising=False)
    monkeypatch.setenv("GPU_CHECK_BUDGET_S", "25")
    check = gpu_check.Check(tmp_path, dry=True)
    caps = []
    assert check.step("bench_head", lambda cap: (caps.append(cap), ("ok", {}))[1])
    assert caps and caps[0] <= 25
    check.budget = 5  # under MIN_STEP_S left: the step is skipped, its function never called
    assert not check.step("bench_step", lambda cap: caps.append(cap))
    assert len(caps) == 1
    summary = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("bench_head", "ok"), ("bench_step", "skipped")]


def test_a_failed_import_stops_the_check_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "IMAGE_MODULES", ("json",))
    monkeypatch.setattr(gpu_check, "CARRIED_MODULES", ("no_such_module_for_the_check",))
    monkeypatch.setenv("GPU_CHECK_DRY_RUN", "1")
    monkeypatch.delenv("GPU_CHECK_T0", raising=False)
    called = []
    for name in ORDER[1:]:
        monkeypatch.setattr(gpu_check.Check, name, lambda self, cap, n=name: called.append(n))
    assert gpu_check.main([str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["imports"] and not called
    assert summary["steps"][0]["failed"] == ["no_such_module_for_the_check"]
    assert "ModuleNotFoundError" in summary["imports"]["no_such_module_for_the_check"]


@pytest.mark.parametrize(
    "name,tag",
    [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100")],
)
def test_result_names_carry_the_device(name, tag):
    assert gpu_check.device_tag_of(name) == tag


@pytest.mark.slow
def test_dry_run_on_cpu_runs_every_step_and_writes_its_json(tmp_path):
    """GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh: every step in order on CPU with tiny shapes, each one's
    JSON written and parseable, CLO_TMA given to the TMA step only (a caller's CLO_TMA=1 does not leak), at
    most 8 files (what the device tool brings back), the total printed."""
    out = tmp_path / "results"
    r = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(out)],
        cwd=ROOT,
        env=_env(GPU_CHECK_DRY_RUN="1", CLO_TMA="1"),
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert re.search(r"total \d+ s of the \d+ s budget", r.stdout)
    summary = json.loads((out / "gpu_check_cpu.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ORDER
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert [s["step"] for s in summary["steps"] if s["clo_tma"] == "1"] == ["tma_ab"]
    assert summary["imports"]["deepspeed"] and summary["imports"]["pydantic"]

    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    docs = {f: json.loads((out / f).read_text()) for f in files if f.endswith(".json")}
    for step in summary["steps"][1:]:
        assert all(f in docs for f in step.get("jsons", [step["json"]])), (step, files)
    assert summary["steps"][3]["jsons"] == ["bench_step_cpu.json", "bench_step_liger_body_cpu.json"]

    head = docs["bench_head_cpu.json"]
    assert head["clo_tma"] is None, "CLO_TMA leaked into the head benchmark"
    assert {(row["shape"], row["head"]) for row in head["rows"]} == {("tiny", "frozen"), ("tiny", "trainable")}
    assert all("fused" in row["ms"] and "reference" not in row["ms"] for row in head["rows"])
    tma = docs["bench_head_tma_cpu.json"]
    assert tma["clo_tma"] == "1" and set(tma["tma_ab"]) == {"tiny/frozen", "tiny/trainable"}
    assert all(ab["fused_ms_tma_off"] and ab["fused_ms_tma_on"] for ab in tma["tma_ab"].values())

    step = docs["bench_step_cpu.json"]
    assert step["profiles"] == ["oasst"]
    assert set(step["results"]["oasst"]) == {"prefix_shared", "padding_free", "none"}
    assert step["errors"] == {"trl_liger": "skipped: Liger's kernels need CUDA"}
    for res in step["results"]["oasst"].values():
        split = res["profile_split"]["ms"]
        assert set(split) == {"attention", "body_gemm", "head", "optimizer", "other", "idle"}
        assert all(split[k] > 0 for k in ("attention", "body_gemm", "head", "optimizer")), split
        assert 0 < res["mfu"]["measured"] < 1.5 and res["mfu"]["datasheet_bf16_dense"] is None
    tests = docs["gpu_tests_cpu.json"]
    assert set(tests) == {"ops", "packing"}
    assert all(t["tests"] > 0 and t["failures"] == t["errors"] == 0 for t in tests.values()), tests
    smoke = docs["gpu_smoke_cpu.json"]
    assert smoke["ok"] and smoke["steps_first_run"] == 20 and smoke["resumed_from_checkpoint"]


def test_model_flops_match_torchs_flop_counter():
    """bench_step's model FLOPs (the MFU numerator) against torch's FLOP counter over the work itself: each sequence
    through the body forward and backward (attention q/k/v/o trainable, eager attention), the frozen head on
    the labelled rows. The counter counts the full T×T score products where the causal count takes half."""
    import bench_step
    import common
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clo_fast.model import apply_trainable_patterns

    model = bench_step.make_model("tiny", torch.float32, "cpu", "eager")
    apply_trainable_patterns(model, bench_step.ATTN_ONLY)
    examples = bench_step.make_examples("demo", 2, bench_step.SHAPES["tiny"]["vocab_size"])
    want = common.model_flops(model, examples)
    w = model.lm_head.weight
    with FlopCounterMode(display=False) as counter:
        for ex in examples:
            for ids, labels in zip(ex["input_ids"], ex["labels"], strict=True):
                h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
                rows = torch.tensor([i for i, t in enumerate(labels) if t != -100])
                logits = h.index_select(0, rows) @ w.T
                logits.logsumexp(-1).sum().backward()
    counted = counter.get_total_flops()
    assert counted == want["linear"] + 2 * want["attention"] + want["head"], (counted, want)
