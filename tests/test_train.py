"""The trainer end to end: 2 CPU ranks (gloo) through the `deepspeed` launcher, as users run it.

One uninterrupted demo run (A) is shared by most checks; a crashed-then-resumed run (B) and a 1-rank run
with twice the accumulation (C) are compared with it. Fast checks (config errors, schedule, sampler) run
in-process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clo_fast.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "clo_fast" / "train.py"
DEMO = ROOT / "configs" / "demo.yaml"
STEPS = 12
LAUNCH_TIMEOUT = 300


def _have_deepspeed_launcher():
    return shutil.which("deepspeed") is not None


def launch(out: Path, cache: Path, *, ranks=2, extra=(), env=None, resume=False, short=True):
    """deepspeed --num_gpus <ranks> clo_fast/train.py --config configs/demo.yaml (+ test overrides; short=False:
    the demo config as it is, only its folders moved)."""
    sets = {
        "train.output_dir": str(out / "run"),
        "data.output_dir": str(out / "data"),
        "data.cache_dir": str(cache),
        "eval.output_dir": str(out / "eval"),
    }
    if short:
        sets |= {"optim.max_steps": STEPS, "train.save_steps": 4, "train.eval_steps": 4, "train.save_total_limit": 3}
    for kv in extra:
        k, v = kv.split("=", 1)
        sets[k] = v
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(TRAIN), "--config", str(DEMO)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    if resume:
        cmd += ["--resume"]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    e.pop("TRITON_INTERPRET", None)  # conftest sets it for the kernel tests; the trainer uses the torch head on CPU
    log = out / "launch.log"
    with open(log, "w") as f, open(out / "launch.err", "w") as ferr:
        rc = subprocess.run(
            cmd, cwd=ROOT, env=e, stdout=f, stderr=ferr, stdin=subprocess.DEVNULL, timeout=LAUNCH_TIMEOUT
        ).returncode
    return subprocess.CompletedProcess(cmd, rc, log.read_text(), (out / "launch.err").read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run: Path) -> dict[int, dict]:
    """step -> merged record (train metrics and eval metrics logged at the same step)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


# ------------------------------------------------------------------------------ launched runs
slow = pytest.mark.slow
# deepspeed is a runtime dependency: a missing launcher must fail these tests, not skip them
needs_launcher = pytest.mark.usefixtures("deepspeed_launcher")


@pytest.fixture(scope="module")
def deepspeed_launcher():
    assert _have_deepspeed_launcher(), "the `deepspeed` launcher is not on PATH (pip install -e '.[test]')"


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
    assert "HF model exported to" in r.stdout and "final metrics:" in r.stdout
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
    r = launch(tmp_path, cache, env={"CLO_FAST_TEST_CRASH": "in_save:8"})
    assert r.returncode != 0
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000004"
    assert (ck / ".tmp-step_00000008").is_dir() and not (ck / "step_00000008").exists()
    r = launch(tmp_path, cache, resume=True)
    assert r.returncode == 0, f"resume failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert "reference log-probs (train): reusing" in r.stdout
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
BAD = [
    ("clo:\n  beta: -1\n", "clo.beta"),
    ("optim:\n  lr: 0\n", "optim.lr"),
    ("optim:\n  micro_batch_sizes: 2\n", "optim.micro_batch_sizes: unknown key"),
    ("train:\n  precision: bf16\n", "train.precision: removed: the precision is stated once, as model.dtype"),
    ("eval:\n  batch_size: 0\n", "eval.batch_size"),  # at load, not after training (train.run_evaluation)
    ("data:\n  target_lang: en\n", "data.target_lang"),
    ("optim:\n  lr_scheduler_type: step\n", "optim.lr_scheduler_type"),
    ("model:\n  trainable_patterns: []\n", "model.trainable_patterns"),
    ("optim:\n  betas: [0.9]\n", "optim.betas"),
    ("clo:\n  mode: ppo\n", "clo.mode"),
]


@pytest.mark.parametrize("text,field", BAD)
def test_bad_config_names_the_field(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(p)


def test_override_errors_name_the_flag(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("clo:\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match=r"^--set clo\.beta=-1: clo\.beta: must be in \(0, 10\]"):
        load_config(p, ["clo.beta=-1"])
    with pytest.raises(ConfigError, match=r"^--set optim\.lrr=1: optim\.lrr: unknown key"):
        load_config(p, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set clo\.beta: expected FIELD=VALUE"):
        load_config(p, ["clo.beta"])
    p.write_text("clo:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=rf"^{p}: clo\.beta"):  # a bad value in the file names the file
        load_config(p, ["clo.lam=0.3"])
    assert load_config(p, ["clo.beta=0.5"]).clo.beta == 0.5
    assert load_config(None, ["data.target_lang=sw"]).data.target_lang == "sw"  # defaults + overrides


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


def test_deepspeed_json_may_not_contradict_the_run_config(tmp_path):
    from clo_fast.training.ds_config import build_ds_config

    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 8}))
    y = tmp_path / "run.yaml"
    y.write_text(f"train:\n  deepspeed_config: {js}\n")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_ds_config(load_config(y), y, 1)
    js.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_ds_config(load_config(y), y, 1)
    cfg = load_config(DEMO)
    ds = build_ds_config(cfg, DEMO, 2)
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_sampler_covers_each_epoch_once_and_is_layout_independent():
    from clo_fast.training.sampler import StepSampler

    n = 37
    two = StepSampler(n, micro=2, accumulation_steps=2, world=2, seed=5)
    one = StepSampler(n, micro=2, accumulation_steps=4, world=1, seed=5)
    assert two.steps_per_epoch == one.steps_per_epoch == 4
    seen = []
    for s in range(4):
        g2 = [i for m in range(2) for r in range(2) for i in two.indices(s, m, r)]
        g1 = [i for m in range(4) for i in one.indices(s, m, 0)]
        assert g1 == g2
        seen += g2
    assert len(set(seen)) == 32  # no repeats within an epoch
    assert two.indices(4, 0, 0) != two.indices(0, 0, 0)  # a new permutation next epoch


def test_lr_schedule():  # transformers' schedules; their shapes are tested in tests/test_training_optim.py
    from clo_fast.config import OptimConfig
    from clo_fast.training.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(
        opt, OptimConfig(warmup_steps=2, lr_scheduler_type="cosine_with_min_lr", min_lr_ratio=0.1), 10
    )
    assert [sched.lr_lambdas[0](s) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert sched.lr_lambdas[0](10) == pytest.approx(0.1)


@slow
@needs_launcher
def test_readme_demo_table_reproduces(tmp_path, cache):
    """The README's before/after table is what its main command prints (the whole demo config: 60 steps on 2
    ranks, then the evaluation), under the library versions the README states."""
    from conftest import readme_table, skip_unless_readme_versions, table_rows

    skip_unless_readme_versions()
    expected = readme_table("| metric | base | trained |")
    # The environment asks for torch's portable kernels and 2 threads a rank: the command pins its own CPU
    # numerics (clo_fast/numerics.py), so the table must not move (the README was measured on AVX2 kernels).
    r = launch(tmp_path, cache, short=False, env={"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, f"demo run failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    printed = table_rows((tmp_path / "eval" / "report.md").read_text())
    assert len(expected) >= 6
    for metric, values in expected.items():
        assert printed.get(metric) == values, f"README row {metric!r}: {values} vs printed {printed.get(metric)}"
