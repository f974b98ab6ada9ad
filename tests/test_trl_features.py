"""What a TRL user expects (issue #12): LoRA through PEFT with the fused head, loss options, warmup_ratio,
metric loggers, the HF export with model card and adapter. In-process on CPU with a tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_training_step import PAD, InProcessEngine, examples, tiny_model

from clo_fast.config import CLOConfig, ConfigError, LoraSettings, RunConfig, load_config
from clo_fast.data import collate_clo
from clo_fast.loss import clo_loss
from clo_fast.model import add_lora_adapters, apply_lora_trainable, build_policy
from clo_fast.training.step import LossSetup, policy_logps, train_step

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- LoRA
def lora_policy(lora=None, tied=False, seed=0):
    hf = tiny_model(seed)
    if tied:
        hf.config.tie_word_embeddings = True
        hf.lm_head.weight = hf.model.embed_tokens.weight
    add_lora_adapters(hf, lora or LoraSettings(r=4, alpha=8.0, dropout=0.0))
    policy = build_policy(hf, head_impl="torch")
    info = apply_lora_trainable(policy)
    return hf, policy, info


def full_logits_logps(hf_model, batch) -> torch.Tensor:
    """Independent: materialized logits in float64, Σ log-softmax at the labels (labels already aligned)."""
    with torch.no_grad():
        logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    logp = torch.log_softmax(logits, -1)
    mask = labels != -100
    picked = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def test_lora_trains_only_adapters_and_starts_at_the_base_model():
    base = tiny_model(0)
    hf, policy, info = lora_policy()
    assert info.names and all(".lora_A." in n or ".lora_B." in n for n in info.names)
    assert all("self_attn" in n for n in info.names)
    assert not policy.lm_head.weight.requires_grad, "the fused head stays frozen"
    assert info.trainable == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    # at step 0 (lora_B = 0) the adapted policy is the base model: its log-probs are the base model's reference
    batch = collate_clo(examples(3), PAD, pad_to_multiple_of=8)
    with torch.no_grad():
        got = policy(batch["input_ids"], batch["attention_mask"], batch["labels"]).double()
    torch.testing.assert_close(got, full_logits_logps(base, batch), rtol=1e-5, atol=1e-4)


def test_lora_step_changes_adapters_only_and_gradient_flows():
    hf, policy, _ = lora_policy()
    frozen_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    setup = LossSetup.from_config(CLOConfig(beta=0.3, lam=0.4))
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    micro = [collate_clo(examples(4)[i : i + 2], PAD, pad_to_multiple_of=8) for i in (0, 2)]
    for _ in range(2):  # the first step only moves lora_B (lora_A's gradient is 0 while B = 0)
        train_step(InProcessEngine(policy, len(micro)), micro, setup, CPU)
        opt.step()
        opt.zero_grad()
    for n, p in policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    lora_b = [p for n, p in policy.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_lora_target_patterns_must_match_and_never_the_head():
    with pytest.raises(ConfigError, match="model.lora.target_patterns.*match no nn.Linear"):
        add_lora_adapters(tiny_model(), LoraSettings(target_patterns=["*nonexistent*"]))
    with pytest.raises(ConfigError, match="match the LM head"):
        add_lora_adapters(tiny_model(), LoraSettings(target_patterns=["*proj", "lm_head"]))


def test_lora_config_section_is_null_by_default_and_set_turns_it_on(tmp_path):
    assert load_config(None).model.lora is None
    cfg = load_config(None, ["model.lora={r: 8}"])
    assert cfg.model.lora == LoraSettings(r=8)
    assert cfg.model.lora.target_patterns == [
        "*self_attn.q_proj",
        "*self_attn.k_proj",
        "*self_attn.v_proj",
        "*self_attn.o_proj",
    ]
    with pytest.raises(ConfigError, match=r"--set model.lora=\{r: 0\}: model.lora.r: must be in \[1, 4096\]"):
        load_config(None, ["model.lora={r: 0}"])
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        load_config(None, ["model.lora={dropout: 1.5}"])


# ------------------------------------------------------------------------------------------ export
class TokenizerStub:
    """What the export asks of a tokenizer: save_pretrained writes its files."""

    def save_pretrained(self, directory):
        from pathlib import Path

        (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"stub": True}))


def run_config(tmp_path, **overrides) -> RunConfig:
    sets = {"train.output_dir": str(tmp_path / "run"), "data.target_lang": "sw", **overrides}
    return load_config(None, sets)


SUMMARY = {"steps": 3, "world_size": 1, "final_metrics": {"loss": 0.61, "rewards/accuracies": 0.75}}


@pytest.mark.parametrize("tied", [False, True])
def test_lora_export_merges_into_a_plain_hf_model_and_saves_the_adapter(tmp_path, tied):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clo_fast.training.export import write_hf_export

    base_dir = tmp_path / "base"
    base = tiny_model(0)
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    base.save_pretrained(base_dir)
    hf, policy, _ = lora_policy(tied=tied)
    hf.load_state_dict(base.state_dict(), strict=False)  # same base weights as the saved base model
    with torch.no_grad():  # a trained adapter: non-zero B
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn_like(p))
    cfg = run_config(tmp_path, **{"model.lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}})
    out = write_hf_export(
        policy.state_dict(), hf.config, None, TokenizerStub(), cfg, {**SUMMARY, "base_model": str(base_dir)}, base_dir
    )
    batch = collate_clo(examples(2), PAD, pad_to_multiple_of=8)
    policy.eval()
    with torch.no_grad():
        want = policy(batch["input_ids"], batch["attention_mask"], batch["labels"]).double()

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters()), "a plain HF model"
    torch.testing.assert_close(full_logits_logps(merged, batch), want, rtol=1e-4, atol=1e-3)

    adapter_dir = out.with_name("hf_adapter")
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8.0
    assert adapter_cfg["base_model_name_or_path"] == str(base_dir)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    torch.testing.assert_close(full_logits_logps(with_adapter, batch), want, rtol=1e-4, atol=1e-3)
    assert (out / "tokenizer_config.json").is_file() and "library_name: transformers" in (out / "README.md").read_text()
    assert "library_name: peft" in (adapter_dir / "README.md").read_text()


def test_export_is_sharded_safetensors_with_config_and_model_card(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    from clo_fast.training.export import add_evaluation_to_card, write_hf_export

    hf = tiny_model(3)
    policy = build_policy(hf, head_impl="torch")
    cfg = run_config(tmp_path, **{"train.export_max_shard_size": "20KB", "model.name_or_path": "org/base"})
    gen = GenerationConfig(max_new_tokens=7, eos_token_id=2)
    out = write_hf_export(
        policy.state_dict(), hf.config, gen, TokenizerStub(), cfg, {**SUMMARY, "base_model": "org/base"}, None
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    saved = {k: v for s in shards for k, v in load_file(str(s)).items()}
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    assert AutoModelForCausalLM.from_pretrained(out).generation_config.max_new_tokens == 7
    assert not out.with_name("hf_adapter").exists()
    card = (out / "README.md").read_text()
    assert "base_model: org/base" in card and "- sw" in card and "- en" in card
    assert "λ = 0.5" in card and "β = 0.1" in card and "| loss | 0.61 |" in card
    add_evaluation_to_card(out, cfg, "| model | fidelity |\n| --- | --- |\n| trained | 0.9 |")
    assert "## Evaluation: base vs trained" in (out / "README.md").read_text()
    assert "| trained | 0.9 |" in (out / "README.md").read_text()


def test_push_to_hub_is_off_by_default_and_uploads_when_set(tmp_path, monkeypatch):
    import huggingface_hub

    from clo_fast.training import hub as export

    assert load_config(None).train.push_to_hub is None
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw))
    )
    cfg = run_config(tmp_path, **{"train.push_to_hub": "me/clo-sw", "model.lora": {"r": 2}})
    export.push_to_hub(cfg)
    assert [(c[0], c[1]) for c in calls] == [
        ("create", "me/clo-sw"),
        ("upload", "me/clo-sw"),
        ("create", "me/clo-sw-adapter"),
        ("upload", "me/clo-sw-adapter"),
    ]
    assert calls[0][2]["private"] is True
    assert calls[1][2]["folder_path"].endswith("hf_model") and calls[3][2]["folder_path"].endswith("hf_adapter")


# ------------------------------------------------------------------------------------ loss options
def float64_clo_loss(pol, ref, n, beta, lam, *, loss_type="sigmoid", eps=0.0, length_normalize=False):
    """Independent float64 loop over examples and directions, written from the formulas in the issue."""
    pol, ref, n = pol.double().tolist(), ref.double().tolist(), n.double().tolist()
    nll = -sum(p[2] for p in pol) / sum(c[2] for c in n)
    total = 0.0
    for p, r, c in zip(pol, ref, n, strict=True):
        for chosen, rejected in ((0, 1), (2, 3)):
            h = [(p[k] - r[k]) / (c[k] if length_normalize else 1.0) for k in (chosen, rejected)]
            z = beta * (h[0] - h[1])
            if loss_type == "ipo":
                total += (z / beta - 1 / (2 * beta)) ** 2
            else:
                log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
                total += -(1 - eps) * log_sig(z) - eps * log_sig(-z)
    return lam * nll + (1 - lam) * total / (2 * len(pol))


def loss_inputs(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    pol = -40 * torch.rand(b, 4, generator=g) - 2
    ref = pol + 6 * torch.randn(b, 4, generator=g)
    n = torch.randint(1, 30, (b, 4), generator=g)
    return pol, ref, n


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.3, "length_normalize": True},
        {"loss_type": "ipo"},
        {"loss_type": "ipo", "length_normalize": True},
        {"length_normalize": True},
    ],
)
def test_loss_options_match_a_float64_reference(options):
    pol, ref, n = loss_inputs()
    beta, lam = 0.2, 0.3
    got, _ = clo_loss(pol, ref, n, beta, lam, **options)
    want = float64_clo_loss(
        pol,
        ref,
        n,
        beta,
        lam,
        loss_type=options.get("loss_type", "sigmoid"),
        eps=options.get("label_smoothing", 0.0),
        length_normalize=options.get("length_normalize", False),
    )
    assert float(got) == pytest.approx(want, rel=1e-5)
    # gradients too: autograd in float64 through clo_loss vs a central difference of the reference
    pol64 = pol.double().requires_grad_()
    loss64, _ = clo_loss(pol64, ref.double(), n, beta, lam, **options)
    loss64.backward()
    h = 1e-6
    for i, k in ((0, 0), (3, 2), (4, 3)):
        bumped = [pol.double().clone() for _ in range(2)]
        bumped[0][i, k] += h
        bumped[1][i, k] -= h
        kw = {
            "loss_type": options.get("loss_type", "sigmoid"),
            "eps": options.get("label_smoothing", 0.0),
            "length_normalize": options.get("length_normalize", False),
        }
        fd = (
            float64_clo_loss(bumped[0], ref, n, beta, lam, **kw) - float64_clo_loss(bumped[1], ref, n, beta, lam, **kw)
        ) / (2 * h)
        assert float(pol64.grad[i, k]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_default_loss_is_unchanged_and_options_differ():
    pol, ref, n = loss_inputs(1)
    default, _ = clo_loss(pol, ref, n, 0.1, 0.5)
    explicit, _ = clo_loss(pol, ref, n, 0.1, 0.5, loss_type="sigmoid", label_smoothing=0.0, length_normalize=False)
    assert torch.equal(default, explicit)
    for opts in ({"label_smoothing": 0.2}, {"loss_type": "ipo"}, {"length_normalize": True}):
        assert not torch.allclose(clo_loss(pol, ref, n, 0.1, 0.5, **opts)[0], default), opts


def test_loss_options_reach_the_training_step_and_are_validated():
    setup = LossSetup.from_config(CLOConfig(loss_type="ipo", length_normalize=True))
    assert setup.options == {"loss_type": "ipo", "label_smoothing": 0.0, "length_normalize": True}
    hf = tiny_model()
    policy = build_policy(hf, head_impl="torch")
    batch = collate_clo(examples(2), PAD, pad_to_multiple_of=8)
    with torch.no_grad():
        logps = policy_logps(policy, batch, None)
    got, _ = setup.loss(logps, batch)
    want, _ = clo_loss(
        logps, batch["ref_logps"], batch["response_tokens"], 0.1, 0.5, loss_type="ipo", length_normalize=True
    )
    assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="clo.label_smoothing: applies to loss_type sigmoid only"):
        load_config(None, ["clo.loss_type=ipo", "clo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="clo.loss_type: must be sigmoid|ipo"):
        load_config(None, ["clo.loss_type=hinge"])


# ----------------------------------------------------------------------------------- warmup_ratio
def test_warmup_ratio_sets_the_warmup_length():
    from clo_fast.config import OptimConfig
    from clo_fast.training.optim import build_optimizer, warmup_steps

    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 95) == 10  # ceil(9.5)
    assert warmup_steps(OptimConfig(warmup_steps=12, warmup_ratio=0.1), 95) == 12
    assert warmup_steps(OptimConfig(), 95) == 0
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(
        model, OptimConfig(lr=1.0, warmup_ratio=0.25, lr_scheduler_type="constant_with_warmup"), 8
    )
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.0])  # 2 warmup steps of 8 (transformers' warmup starts at 0)
    with pytest.raises(ConfigError, match="optim.warmup_ratio"):
        load_config(None, ["optim.warmup_ratio=1.5"])


# ---------------------------------------------------------------------------------------- loggers
def test_every_report_to_name_has_a_logger():
    from clo_fast.config import REPORTERS
    from clo_fast.training.metrics import LOGGERS

    assert set(REPORTERS) == set(LOGGERS)
    with pytest.raises(ConfigError, match="train.report_to: unknown 'neptune'"):
        load_config(None, ["train.report_to=[jsonl, neptune]"])
    with pytest.raises(ConfigError, match="train.tensorboard: removed: list tensorboard in train.report_to"):
        load_config(None, ["train.tensorboard=true"])


RECORDS = [(1, {"loss": 0.75, "rewards/accuracies": 0.5}), (2, {"loss": 0.5, "samples/sw": "Habari ya leo?"})]


def test_all_loggers_write_offline(tmp_path, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clo_fast.training.metrics import MetricsSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = run_config(
        tmp_path, **{"train.report_to": ["jsonl", "tensorboard", "wandb", "mlflow"], "train.run_name": "r1"}
    )
    out = tmp_path / "run"
    out.mkdir()
    sink = MetricsSink(cfg, 0)
    for step, rec in RECORDS:
        sink.write(step, rec)
    sink.close()

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": s, **r} for s, r in RECORDS]

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.75), (2, 0.5)]

    run_id = (out / "wandb_run_id").read_text()
    # the offline run log (what `wandb sync` uploads) holds the history records: keys and JSON values as text
    (log_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    raw = log_file.read_bytes()
    assert b"rewards/accuracies" in raw and b"0.75" in raw
    (sample,) = (log_file.parent / "files" / "media").rglob("*.html")  # the sample text, as W&B HTML media
    assert "Habari ya leo?" in sample.read_text()
    assert b"target_lang" in raw  # the run config

    client = mlflow.tracking.MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("clo-fast").experiment_id])
    assert run.info.run_name == "r1" and run.data.params["data.target_lang"] == "sw"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 0.75), (2, 0.5)]
    assert (
        "Habari"
        in (out / "mlruns")
        .joinpath(run.info.experiment_id, run.info.run_id, "artifacts", "samples", "step_0000002_samples_sw.txt")
        .read_text()
    )


def test_jsonl_logger_drops_lines_after_the_resumed_checkpoint(tmp_path):
    from clo_fast.training.metrics import MetricsSink

    cfg = run_config(tmp_path, **{"train.report_to": ["jsonl"]})
    (tmp_path / "run").mkdir()
    sink = MetricsSink(cfg, 0)
    for step in (1, 2, 3):
        sink.write(step, {"loss": float(step)})
    resumed = MetricsSink(cfg, 2)
    resumed.write(3, {"loss": 30.0})
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]


# ------------------------------------------------------------------- LoRA under ZeRO-3, launched
@pytest.mark.slow
def test_lora_under_zero3_two_ranks_reference_is_base_and_export_merges(tmp_path, demo_cache):
    """deepspeed, 2 CPU ranks, ZeRO-3, fused head, model.lora on: the stored reference log-probs are the base
    model's (plain HF, materialized logits), only the attention projections change in the merged export, and
    base + saved adapter computes what the merged model computes."""
    from datasets import load_from_disk
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_train import launch, metrics
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


# ------------------------------------------------------------------------------ launchers, defaults
def test_plain_python_gets_a_one_process_group_without_mpi():
    """`python clo_fast/train.py` has no launcher environment: DeepSpeed would go to MPI discovery (mpi4py)."""
    import os
    import subprocess
    import sys

    from clo_fast.training.distributed import LAUNCHER_ENV

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    code = (
        "from clo_fast.training.distributed import init_process_group; import torch.distributed as d; "
        "dev = init_process_group(); print('group', d.get_rank(), d.get_world_size(), dev.type)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "group 0 1 cpu" in r.stdout


def test_launcher_environment_is_left_alone(monkeypatch):
    from clo_fast.training.distributed import single_process_env

    monkeypatch.setenv("RANK", "3")
    assert single_process_env() == {}
    monkeypatch.delenv("RANK")
    env = single_process_env()
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0


def test_gpu_defaults_bf16_and_checkpointing_unless_set(monkeypatch):
    from clo_fast.config import ModelConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = ModelConfig()
    assert (cpu.dtype, cpu.gradient_checkpointing) == ("float32", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = ModelConfig()
    assert (gpu.dtype, gpu.gradient_checkpointing) == ("bfloat16", True)
    assert load_config(None, ["model.dtype=float32", "model.gradient_checkpointing=false"]).model.dtype == "float32"
    assert load_config(None, ["model.gradient_checkpointing=false"]).model.gradient_checkpointing is False


# ------------------------------------------------------------------------- fidelity during training
def test_fidelity_probe_logs_fidelity_reference_nll_and_samples(demo_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from clo_fast.evaluate.probe import FidelityProbe
    from clo_fast.evaluate.prompts import encode_prompt
    from clo_fast.model import causal_lm

    tok = demo_tokenizer
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    policy = build_policy(hf, head_impl="torch")
    assert causal_lm(policy) is hf and not any(k.startswith("_causal_lm") for k in policy.state_dict())
    cfg = run_config(tmp_path, **{"train.fidelity_prompts": 2, "train.fidelity_samples": 1, "eval.max_new_tokens": 4})
    records = [
        {"id": "a", "lang": "en", "prompt": "Name a colour.", "reference": "Blue."},
        {"id": "b", "lang": "en", "prompt": "Say hello.", "reference": "Hello there."},
        {"id": "c", "lang": "en", "prompt": "Not used: over the per-language cap.", "reference": "x"},
        {"id": "d", "lang": "sw", "prompt": "Taja rangi.", "reference": "Bluu."},
    ]
    probe = FidelityProbe(cfg, tok, records)
    policy.train()
    out = probe(policy)
    assert hf.training, "the model is back in training mode"
    assert set(out) == {f"{k}/{lang}" for k in ("fidelity", "chrf", "ref_nll", "samples") for lang in ("en", "sw")}
    assert 0.0 <= out["fidelity/en"] <= 1.0 and 0.0 <= out["fidelity/sw"] <= 1.0
    assert "Name a colour." in out["samples/en"] and "Say hello." not in out["samples/en"]  # fidelity_samples = 1

    # reference NLL per token, independently: float64 full logits over prompt + reference + EOS
    m64 = LlamaForCausalLM(hf.config).double().eval()
    m64.load_state_dict(hf.state_dict())
    total, count = 0.0, 0
    for rec in records[:2]:
        p = encode_prompt(tok, rec["prompt"], cfg.data)
        r = tok(rec["reference"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(m64(torch.tensor([p + r])).logits[0], -1)
        total += -sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(r))
        count += len(r)
    assert out["ref_nll/en"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.slow
def test_plain_python_launch_with_lora_and_the_fidelity_probe(tmp_path, demo_cache):
    """`python clo_fast/train.py` (no launcher, no MPI): one ZeRO-3 process; the probe logs fidelity, reference
    NLL and samples at every eval; LoRA export next to the merged model."""
    import os
    import subprocess
    import sys

    from test_train import DEMO, ROOT, TRAIN, metrics

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
