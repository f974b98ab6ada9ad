"""The trainer end to end: 2 CPU ranks (gloo) through the `deepspeed` launcher, as users run it.

One uninterrupted demo run (A) is shared by most checks; a crashed-then-resumed run (B) and a 1-rank run
with twice the accumulation (C) are compared with it; other launched runs (a diverging run, LoRA under ZeRO-3,
a plain `python` launch, a cold cache) check what only a whole run shows. The config's errors, the schedule and
the sampler are checked in-process in tests/test_config.py, tests/test_optim.py and tests/test_sampler.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DEMO,
    ROOT,
    STEPS,
    TRAIN,
    fault_env,
    full_logits_logps,
    have_deepspeed_launcher,
    launch,
    metrics,
    weights,
)

from clo_fast.atomic import LOCK_NAME, OWNER_MARKER
from clo_fast.config import load_config
from clo_fast.data import collate_clo

# ------------------------------------------------------------------------------ launched runs
slow = pytest.mark.slow
# deepspeed is a runtime dependency: a missing launcher must fail these tests, not skip them
needs_launcher = pytest.mark.usefixtures("deepspeed_launcher")


@pytest.fixture(scope="module")
def deepspeed_launcher():
    assert have_deepspeed_launcher(), "the `deepspeed` launcher is not on PATH (pip install -e '.[test]')"


@pytest.fixture(scope="module")
def cache(demo_cache):
    return demo_cache  # shared with test_model: the demo model is built once


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("run_a")
    r = launch(out, cache)
    assert r.returncode == 0, f"demo run failed; log: {out / 'launch.log'}\n{r.stderr[-3000:]}"
    return out, r


@slow
@needs_launcher
def test_demo_trains_loss_falls_accuracy_rises(run_a):
    out, r = run_a
    m = metrics(out / "run")
    steps = sorted(s for s in m if s >= 1 and "loss" in m[s])
    assert steps == list(range(1, STEPS + 1))
    first, last = m[steps[0]], m[steps[-1]]
    for key in (
        "loss",
        "nll",
        "cl_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "en/rewards/accuracies",
        "tgt/rewards/accuracies",
        "grad_norm",
        "learning_rate",
        "tokens/s",
        "peak_memory_mib",
    ):
        assert key in last and math.isfinite(last[key]), key
    assert first["cl_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    early = sum(m[s]["loss"] for s in steps[:3]) / 3
    late = sum(m[s]["loss"] for s in steps[-3:]) / 3
    assert late < early - 0.05, (early, late)
    assert m[0]["eval/loss"] > m[STEPS]["eval/loss"]
    acc_early = sum(m[s]["rewards/accuracies"] for s in steps[:2]) / 2
    acc_late = sum(m[s]["rewards/accuracies"] for s in steps[-3:]) / 3
    assert acc_late > acc_early + 0.2, (acc_early, acc_late)
    assert m[STEPS]["eval/rewards/accuracies"] > 0.5
    # LR: transformers' linear warmup over 2 steps (from 0) to the config's peak, then cosine down to 0.1 × peak
    peak = load_config(DEMO).optim.lr
    lr = [m[s]["learning_rate"] for s in steps]
    assert lr[0] == 0 and lr[1] == pytest.approx(peak / 2) and lr[2] == pytest.approx(peak) and lr[-1] < lr[3]
    assert "HF model exported to" in r.stderr and "final metrics:" in r.stderr
    assert list((out / "run" / "tensorboard").glob("events.out.tfevents.*"))


@slow
@needs_launcher
def test_only_trainable_parameters_change_and_export_generates(run_a):
    out, _ = run_a
    run = out / "run"
    summary = json.loads((run / "hf_model" / "clo_training_summary.json").read_text())
    base, new = weights(Path(summary["base_model"])), weights(run / "hf_model")
    assert base.keys() == new.keys()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    attn = {k for k in base if any(f"self_attn.{p}_proj" in k for p in "qkvo")}
    assert changed == attn, sorted(changed ^ attn)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run / "hf_model"))
    tok = AutoTokenizer.from_pretrained(str(run / "hf_model"))
    ids = tok("### Instruction:\nHello\n\n### Response:\n", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # checkpoints: complete ones only, `latest` points at the last
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == f"step_{STEPS:08d}"
    assert not list(ck.glob(".tmp-*"))
    assert sorted(p.name for p in ck.glob("step_*")) == [f"step_{s:08d}" for s in (4, 8, 12)]


@slow
@needs_launcher
def test_zero3_fused_head_matches_reference_on_first_batch(run_a):
    """Step 1 of the ZeRO-3 run (fused head, 2 ranks × 2 micro-batches) against reference_clo_loss with a
    plain HF model on the same 8 examples: same loss and same global gradient norm."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from clo_fast.data import collate_clo
    from clo_fast.loss import reference_clo_loss
    from clo_fast.model import apply_trainable_patterns
    from clo_fast.pretrained import load_tokenizer
    from clo_fast.training.sampler import StepSampler

    out, _ = run_a
    run = out / "run"
    cfg = load_config(run / "config.yaml")
    summary = json.loads((run / "hf_model" / "clo_training_summary.json").read_text())
    ds = load_from_disk(str(run / "ref_data" / "train"))
    o = cfg.optim
    sampler = StepSampler(len(ds), o.micro_batch_examples, o.gradient_accumulation_steps, 2, o.seed)
    idx = [i for m in range(o.gradient_accumulation_steps) for r in range(2) for i in sampler.indices(0, m, r)]
    tok = load_tokenizer(summary["base_model"])
    batch = collate_clo([ds[i] for i in idx], tok.pad_token_id, cfg.train.pad_to_multiple_of)
    model = AutoModelForCausalLM.from_pretrained(summary["base_model"], dtype=torch.float32)
    apply_trainable_patterns(model, cfg.model.trainable_patterns)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, _ = reference_clo_loss(logits, batch["labels"], batch["ref_logps"], cfg.clo.beta, cfg.clo.lam)
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.requires_grad)).item()
    step1 = metrics(run)[1]
    assert step1["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert step1["grad_norm"] == pytest.approx(gnorm, rel=1e-4)


@slow
@needs_launcher
def test_crash_mid_checkpoint_then_resume_matches_uninterrupted(run_a, tmp_path, cache):
    """Killed (SIGKILL) while writing the step-8 checkpoint: the half-written one is never taken for
    complete; --resume continues from step 4 and reproduces the uninterrupted run exactly."""
    out_a, _ = run_a
    r = launch(tmp_path, cache, env=fault_env("kill_in_save", 8))
    assert r.returncode != 0
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000004"
    assert (ck / ".tmp-step_00000008").is_dir() and not (ck / "step_00000008").exists()
    r = launch(tmp_path, cache, resume=True)
    assert r.returncode == 0, f"resume failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    assert "resumed from" in r.stderr and "at step 4" in r.stderr
    assert "reference log-probs (train): reusing" in r.stderr
    a, b = metrics(out_a / "run"), metrics(tmp_path / "run")
    assert sorted(a) == sorted(b)
    for s in range(1, STEPS + 1):
        for k in ("loss", "nll", "cl_loss", "rewards/accuracies", "grad_norm", "learning_rate"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-6, abs=1e-7), (s, k)
    wa, wb = weights(out_a / "run" / "hf_model"), weights(tmp_path / "run" / "hf_model")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)
    assert not list(ck.glob(".tmp-*"))


@slow
@needs_launcher
def test_one_rank_accumulation_equals_two_ranks(run_a, tmp_path, cache):
    """1 rank × 4 micro-batches == 2 ranks × 2 micro-batches (same global batch, same examples)."""
    out_a, _ = run_a
    r = launch(
        tmp_path,
        cache,
        ranks=1,
        extra=[
            "optim.gradient_accumulation_steps=4",
            "train.eval_steps=0",
            "train.save_steps=0",
            "train.export_hf=true",
        ],
    )
    assert r.returncode == 0, f"1-rank run failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    a, c = metrics(out_a / "run"), metrics(tmp_path / "run")
    for s in range(1, STEPS + 1):
        for k in ("loss", "nll", "cl_loss", "grad_norm"):
            assert c[s][k] == pytest.approx(a[s][k], rel=1e-4, abs=1e-5), (s, k, c[s][k], a[s][k])
    wa, wc = weights(out_a / "run" / "hf_model"), weights(tmp_path / "run" / "hf_model")
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], rtol=1e-3, atol=1e-5)


@slow
@needs_launcher
@pytest.mark.parametrize("packing", ["none", "padding_free"])
def test_every_packing_mode_trains_under_zero3_with_the_same_first_step(run_a, tmp_path, cache, packing):
    """2-rank ZeRO-3 in the other layouts (run A uses auto = prefix_shared with sdpa on CPU): the reference pass
    and the first step's loss are the same; the run trains to the end."""
    out_a, r_a = run_a
    assert "packing prefix_shared" in r_a.stdout + r_a.stderr
    r = launch(
        tmp_path,
        cache,
        extra=[
            f"train.packing={packing}",
            "optim.max_steps=3",
            "train.eval_steps=0",
            "train.save_steps=0",
            "train.export_hf=false",
        ],
    )
    assert r.returncode == 0, f"{packing} run failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    assert f"packing {packing}" in r.stdout + r.stderr
    a, c = metrics(out_a / "run"), metrics(tmp_path / "run")
    for k in ("loss", "nll", "cl_loss"):
        assert c[1][k] == pytest.approx(a[1][k], rel=1e-5, abs=1e-6), (k, c[1][k], a[1][k])
    assert 3 in c


# ------------------------------------------------------------------------------------ fast checks


@pytest.mark.slow  # starts processes for several seconds
def test_train_script_fails_fast_on_bad_config(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  deepspeed_config: nowhere.json\n")
    r = subprocess.run(
        [sys.executable, str(TRAIN), "--config", str(p)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "train.deepspeed_config" in r.stderr and "nowhere.json" in r.stderr
    p.write_text("optim:\n  gradient_accumulation_steps: 0\n")
    r = subprocess.run(
        [sys.executable, str(TRAIN), "--config", str(p)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "optim.gradient_accumulation_steps" in r.stderr
    r = subprocess.run(
        [sys.executable, str(TRAIN), "--config", str(DEMO), "--set", "clo.lam=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "clo.lam" in r.stderr


def test_a_refused_resume_leaves_the_finished_run_as_it_was(tmp_path, monkeypatch):
    """A resume with no steps left is refused at start-up, before anything is written: the run's config.yaml
    (its record of how it was trained) is not rewritten with the refused settings. In-process, no process group."""
    from clo_fast.config import ConfigError, to_dict
    from clo_fast.train import Run
    from clo_fast.training import distributed
    from clo_fast.training.checkpoint import checkpoint_root, prepare_output_dir, write_checksums

    run = tmp_path / "run"
    cfg = load_config(DEMO, [f"train.output_dir={run}", "optim.max_steps=2"])
    prepare_output_dir(cfg, None).release()
    (run / "config.yaml").write_text("how the run was trained\n")
    tag = checkpoint_root(cfg) / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 1, "config": to_dict(cfg)}))
    write_checksums(tag)
    (checkpoint_root(cfg) / "latest").write_text(tag.name)
    files = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME}  # noqa: E731
    before = files()  # (the run lock goes at the process's exit)
    monkeypatch.setattr(distributed, "init_process_group", lambda timeout_s=None: torch.device("cpu"))
    refused = load_config(DEMO, [f"train.output_dir={run}", "optim.max_steps=1"])
    with pytest.raises(ConfigError, match="nothing is left to train"):
        Run(refused, DEMO, "latest").setup()
    assert files() == before


@slow
@needs_launcher
def test_readme_demo_table_reproduces(tmp_path, cache):
    """The README's before/after table is what its main command prints (the whole demo config: 60 steps on 2
    ranks, then the evaluation), under the library versions the README states."""
    from helpers import readme_table, require_locked_versions, table_rows

    require_locked_versions()
    expected = readme_table("| metric | base | trained |")
    # The environment asks for torch's portable kernels and 2 threads a rank: the command pins its own CPU
    # numerics (clo_fast/numerics.py), so the table must not move (the README was measured on AVX2 kernels).
    r = launch(tmp_path, cache, short=False, env={"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, f"demo run failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    printed = table_rows((tmp_path / "eval" / "report.md").read_text())
    assert len(expected) >= 6
    for metric, values in expected.items():
        assert printed.get(metric) == values, f"README row {metric!r}: {values} vs printed {printed.get(metric)}"


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_and_leaves_the_folder_reusable(tmp_path, cache):
    """2 CPU ranks through the deepspeed launcher; the loss of step 2 turns NaN (the test hook: an LR that would
    diverge is refused by the config now): the run stops naming the step, writes no checkpoint and no export,
    and releases its lock."""
    from helpers import launch

    extra = (
        "optim.max_steps=4",
        "train.save_steps=0",
        "train.eval_steps=0",
        "train.run_evaluation=false",
    )
    r = launch(tmp_path, cache, extra=extra, env=fault_env("nan_loss", 2))  # the shared demo model
    assert r.returncode != 0
    assert "[train] stopped: step 2:" in r.stderr and "not finite" in r.stderr
    run = tmp_path / "run"
    assert (run / OWNER_MARKER).is_file()
    assert not (run / "checkpoints").exists() and not (run / "hf_model").exists()
    assert not (run / ".clo_fast.lock").exists()


@pytest.mark.slow
def test_lora_under_zero3_two_ranks_reference_is_base_and_export_merges(tmp_path, demo_cache):
    """deepspeed, 2 CPU ranks, ZeRO-3, fused head, model.lora on: the stored reference log-probs are the base
    model's (plain HF, materialized logits), only the attention projections change in the merged export, and
    base + saved adapter computes what the merged model computes."""
    from datasets import load_from_disk
    from helpers import launch, metrics
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from clo_fast.pretrained import load_tokenizer

    steps = 6
    r = launch(
        tmp_path,
        demo_cache,
        extra=[
            "model.lora={r: 4, alpha: 8.0, dropout: 0.0}",
            f"optim.max_steps={steps}",
            "train.run_evaluation=false",
            "train.save_steps=0",
            "train.eval_steps=0",
        ],
    )
    assert r.returncode == 0, f"LoRA run failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    run = tmp_path / "run"
    m = metrics(run)
    assert m[1]["cl_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert m[steps]["loss"] < m[1]["loss"]

    summary = json.loads((run / "hf_model" / "clo_training_summary.json").read_text())
    base_dir = summary["base_model"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = load_tokenizer(base_dir)
    ds = load_from_disk(str(run / "ref_data" / "train"))
    batch = collate_clo([ds[i] for i in range(4)], tok.pad_token_id, pad_to_multiple_of=16)
    torch.testing.assert_close(
        batch["ref_logps"].double().view(-1), full_logits_logps(base, batch), rtol=1e-4, atol=2e-3
    )

    old, new = (
        load_file(str(Path(base_dir) / "model.safetensors")),
        load_file(str(run / "hf_model" / "model.safetensors")),
    )
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(any(f"self_attn.{p}_proj.weight" in k for p in "qkvo") for k in changed), changed
    merged = AutoModelForCausalLM.from_pretrained(run / "hf_model", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run / "hf_adapter")
    torch.testing.assert_close(
        full_logits_logps(adapted, batch), full_logits_logps(merged, batch), rtol=1e-5, atol=1e-3
    )
    assert "LoRA r = 4" in (run / "hf_model" / "README.md").read_text()


@pytest.mark.slow
def test_plain_python_launch_with_lora_and_the_fidelity_probe(tmp_path, demo_cache):
    """`python clo_fast/train.py` (no launcher, no MPI): one ZeRO-3 process; the probe logs fidelity, reference
    NLL and samples at every eval; LoRA export next to the merged model."""
    import subprocess
    import sys

    from helpers import DEMO, ROOT, TRAIN, metrics

    from clo_fast.training.distributed import LAUNCHER_ENV

    sets = {
        "train.output_dir": tmp_path / "run",
        "data.output_dir": tmp_path / "data",
        "data.cache_dir": demo_cache,
        "optim.max_steps": 4,
        "train.eval_steps": 2,
        "train.save_steps": 0,
        "train.run_evaluation": "false",
        "train.fidelity_prompts": 2,
        "eval.max_new_tokens": 8,
        "model.lora": "{r: 4}",
    }
    cmd = [sys.executable, str(TRAIN), "--config", str(DEMO)] + [
        a for k, v in sets.items() for a in ("--set", f"{k}={v}")
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(tmp_path / "run")
    for step in (0, 2, 4):
        assert {"fidelity/en", "fidelity/sw", "ref_nll/en", "ref_nll/sw", "samples/sw"} <= set(m[step]), step
    assert m[4]["ref_nll/sw"] < m[0]["ref_nll/sw"]  # the target-language NLL is trained
    assert (tmp_path / "run" / "hf_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_demo_run_on_a_cold_cache_with_a_short_collective_timeout(tmp_path):
    """Rank 0 builds the demo model (~45 s) while rank 1 waits for it on disk, not in a collective: with a 20 s
    process-group timeout (and DEEPSPEED_TIMEOUT=1) the run still passes."""
    from helpers import launch

    sets = [
        "train.dist_timeout_s=20",
        "optim.max_steps=2",
        "train.run_evaluation=false",
        "train.export_hf=false",
        "train.save_steps=0",
        "train.eval_steps=0",
    ]
    r = launch(tmp_path, tmp_path / "cold_cache", extra=sets, env={"DEEPSPEED_TIMEOUT": "1"})
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert (tmp_path / "cold_cache" / "demo_model").is_dir() and "final metrics" in r.stderr


@slow
@needs_launcher
def test_a_two_language_demo_run_reports_both_languages(tmp_path, cache):
    extra = (
        "data.target_langs=[sw, ko]",
        "train.fidelity_prompts=2",
        "train.eval_steps=4",
        "eval.max_prompts=3",
        "eval.max_new_tokens=8",
    )
    r = launch(tmp_path, cache, ranks=1, extra=extra)
    assert r.returncode == 0, f"run failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    logged = metrics(tmp_path / "run")
    trained = [m for m in logged.values() if "loss" in m]
    per_language = {f"{k}/{lang}" for k in ("nll", "rewards/margins", "rewards/accuracies") for lang in ("sw", "ko")}
    assert trained and all(per_language <= set(m) for m in trained)  # the batches carried the language
    probed = [m for m in logged.values() if "fidelity/sw" in m]
    assert probed and all({"fidelity/ko", "fidelity/en", "samples/ko", "samples/sw"} <= set(m) for m in probed)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["target_langs"] == ["sw", "ko"] and report["languages"] == ["en", "sw", "ko"]
    assert report["n_prompts"] == {"en": 3, "sw": 3, "ko": 3}
    assert "data: 240 train / 28 eval examples" in r.stderr  # 120 + 14 pairs, each in both languages


@slow
@needs_launcher
def test_the_english_guard_warns_at_the_eval_step_english_degrades(tmp_path, cache):
    """lr 0.05 on the demo erodes English within a few updates: the run says so at the eval step where the held-out
    English NLL/token first passes train.english_nll_warn above the reference's, naming the lr; and keeps going."""
    from helpers import metrics

    r = launch(tmp_path, cache, extra=["optim.lr=0.05", "train.english_nll_warn=0.05"])
    assert r.returncode == 0, f"{r.stderr[-3000:]}"
    m = metrics(tmp_path / "run")
    evals = {s: rec["eval/en/nll_increase"] for s, rec in sorted(m.items()) if "eval/en/nll_increase" in rec}
    first = next(s for s, inc in evals.items() if inc > 0.05)  # the demo at this lr does degrade: else it fails here
    warned = [line for line in r.stderr.splitlines() if "English is degrading" in line]
    assert warned and f"step {first}:" in warned[0] and "optim.lr = 0.05" in warned[0]
    assert all(abs(m[s]["eval/en/nll_per_token"] / m[s]["eval/en/ref_nll_per_token"] - 1 - inc) < 1e-9
               for s, inc in evals.items())  # fmt: skip
