"""clo_fast.model and clo_fast.demo_model: the demo model build, freezing, and the fused head against
`reference_clo_loss` (loss and gradients on the same batch). In-process, CPU, no DeepSpeed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from helpers import CPU, PAD, InProcessEngine, examples, full_logits_logps, lora_policy, save_tiny_model, tiny_model

from clo_fast.config import CLOConfig, ConfigError, LoraSettings, ModelConfig
from clo_fast.data import collate_clo
from clo_fast.demo_model import demo_records, demo_texts, heldout_ids
from clo_fast.loss import clo_loss, reference_clo_loss
from clo_fast.model import (
    FusedLogprobHead,
    add_lora_adapters,
    apply_trainable_patterns,
    build_policy,
    causal_lm,
    load_policy,
)
from clo_fast.pretrained import load_tokenizer
from clo_fast.training.step import LossSetup, train_step

ATTN = ModelConfig().trainable_patterns


@pytest.fixture(scope="module")
def demo_dir(demo_model_dir):
    return demo_model_dir  # built once per session (tests/conftest.py), reused by test_train through the cache


def _digest(d):
    """The model files' hashes (the ownership marker of a published folder is not part of the model)."""
    files = (p for p in sorted(d.iterdir()) if p.is_file() and p.name != ".clo_fast_output")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow  # builds the demo model (once per session)
def test_demo_model_is_deterministic_and_loads(demo_dir, tmp_path):
    # built again the way every clo-fast command builds it: its own process, CPU numerics pinned (this test
    # process is not pinned, and on another dispatch level its float sums legitimately differ)
    again = tmp_path / "again"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "clo_fast.demo_model", "--out", str(again)], env=env, check=True)
    assert _digest(demo_dir) == _digest(again)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(demo_dir))
    tok = load_tokenizer(str(demo_dir))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    enc = tok.apply_chat_template(
        [{"role": "user", "content": demo_texts()[0]}], add_generation_prompt=True, tokenize=True
    )
    ids = enc["input_ids"]
    assert tok.decode(ids).endswith("<|assistant|>\n")
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)


def test_demo_pretraining_leaves_out_the_demo_configs_eval_split(tmp_path):
    """The base model is pretrained without the pairs the demo run evaluates on: heldout_ids reproduces the
    "eval" split that clo_fast.data builds for configs/demo.yaml."""
    from pathlib import Path

    from clo_fast.config import load_config
    from clo_fast.data import build_text_dataset

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml").data
    cfg.cache_dir = str(tmp_path)
    dsd, _ = build_text_dataset(cfg, progress=False)
    assert set(dsd["eval"]["id"]) == heldout_ids(demo_records()) and len(dsd["eval"]) > 0


def _batch(vocab, B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (4 * B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # some padding
    labels = torch.full_like(ids, -100)
    labels[:, 9:-1] = ids[:, 10:]
    labels[mask == 0] = -100
    resp = (labels != -100).sum(1).view(B, 4)
    return ids, mask, labels, resp


@pytest.mark.slow  # builds the demo model (once per session)
def test_freezing_attention_only_with_tied_embeddings(demo_dir):
    policy, info, _, _ = load_policy(ModelConfig(name_or_path=str(demo_dir)), head_impl="torch")
    assert policy.config.tie_word_embeddings
    assert policy.lm_head.weight is policy.model.embed_tokens.weight  # the head owns the tied Parameter
    for name, p in policy.named_parameters():
        assert p.requires_grad == ("self_attn" in name), name
    assert info.trainable < info.total and all("self_attn" in n for n in info.names)
    # a tied head trains when any of its names matches (here: the lm_head name)
    info2 = apply_trainable_patterns(policy, ["lm_head.weight"])
    assert policy.model.embed_tokens.weight.requires_grad and info2.names == ["model.embed_tokens.weight"]
    with pytest.raises(ConfigError, match="model.trainable_patterns"):
        apply_trainable_patterns(policy, ["*no_such_module*"])


@pytest.mark.slow  # builds the demo model (once per session)
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_fused_head_matches_reference_clo_loss(demo_dir, impl):
    """Same batch, same weights: the backbone→fused head→clo_loss path and the materialized-logits
    reference_clo_loss give the same loss and the same gradients on every trainable parameter."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float64)
    policy = build_policy(hf, head_impl=impl)
    apply_trainable_patterns(policy, ATTN)
    ids, mask, labels, resp = _batch(hf.config.vocab_size)
    B = resp.shape[0]
    with torch.no_grad():
        ref = policy(ids, mask, labels).view(B, 4) + torch.randn(
            B, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        )
    params = [p for p in policy.parameters() if p.requires_grad]

    logps = policy(ids, mask, labels).view(B, 4)
    loss_f, m_f = clo_loss(logps, ref, resp, beta=0.1, lam=0.5)
    g_f = torch.autograd.grad(loss_f, params)

    logits = hf(input_ids=ids, attention_mask=mask).logits  # the original HF head, materialized
    loss_r, m_r = reference_clo_loss(logits, labels, ref, beta=0.1, lam=0.5)
    g_r = torch.autograd.grad(loss_r, params)

    assert torch.allclose(loss_f, loss_r, rtol=1e-10, atol=1e-10)
    for k in ("nll", "cl_loss", "rewards/accuracies", "rewards/margins"):
        assert torch.allclose(m_f[k], m_r[k], rtol=1e-9, atol=1e-9), k
    for a, b in zip(g_f, g_r, strict=False):  # the head's backward rounds its per-token upstream gradient to fp32
        assert (a - b).norm() <= 1e-6 * b.norm() + 1e-12


@pytest.mark.slow  # builds the demo model (once per session)
def test_head_casts_hidden_and_reports_shape(demo_dir):
    w = torch.nn.Parameter(torch.randn(50, 8), requires_grad=False)
    head = FusedLogprobHead(w, impl="torch")
    h = torch.randn(4, 6, 8, dtype=torch.float64)
    y = torch.randint(0, 50, (4, 6))
    out = head(h, y)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert "weight=(50, 8)" in repr(head)


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


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "extra", "message"),
    [
        ("PhiConfig", "PhiForCausalLM", {}, r"LM head has a bias"),
        ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}, r"config.logit_scale = 0.0625"),
        ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}, r"config.logits_scaling = 8.0"),
        ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}, r"config.final_logit_softcapping = 30.0"),
    ],
)
def test_heads_the_fused_path_does_not_represent_fail_at_load(tmp_path, config_cls, model_cls, extra, message):
    from clo_fast.config import ModelConfig
    from clo_fast.model import load_policy

    path = save_tiny_model(tmp_path, config_cls, model_cls, "m", **extra)
    with pytest.raises(ConfigError, match=rf"model '.*m' \({model_cls}\).*{message}"):
        cfg = ModelConfig(name_or_path=str(path), trainable_patterns=["*"], attn_implementation="eager")
        load_policy(cfg, cache_dir=str(tmp_path))


def test_plain_heads_load_and_neutral_scaling_is_accepted(tmp_path):
    from clo_fast.config import ModelConfig
    from clo_fast.model import load_policy

    path = save_tiny_model(tmp_path, "GraniteConfig", "GraniteForCausalLM", "g", logits_scaling=1.0)
    load_policy(ModelConfig(name_or_path=str(path), trainable_patterns=["*q_proj*"]), cache_dir=str(tmp_path))


def _logps_float64(model, ids):
    """Independent reference: full logits in float64, Σ log p(next token) per sequence."""
    import torch

    logits = model(input_ids=ids).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return lp.sum(-1)


def test_dropout_is_off_in_the_policy_as_in_the_reference_pass(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from clo_fast.config import ModelConfig
    from clo_fast.constants import IGNORE_INDEX
    from clo_fast.model import load_policy

    path = save_tiny_model(tmp_path, "LlamaConfig", "LlamaForCausalLM", "d", attention_dropout=0.5)
    policy = load_policy(
        ModelConfig(name_or_path=str(path), attn_implementation="eager"), head_impl="reference", cache_dir="x"
    )[0]
    assert policy.training
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]  # labels aligned with the rows that score them
    mask = torch.ones_like(ids)
    first, second = policy(ids, mask, labels), policy(ids, mask, labels)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = _logps_float64(ref, ids)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(first, second)
    # the same model left in train mode with its dropout does differ: the check above can fail
    ref.train()
    torch.manual_seed(0)
    assert not torch.allclose(_logps_float64(ref, ids), expected, atol=1e-3)


# -------------------- Dropout is off while training, LoRA adapters' included, as TRL's disable_dropout does (clo
def _tiny_llama_folder(path):
    from helpers import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(attention_dropout=0.3)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("lora_dropout", [0.5, 0.0])
def test_lora_dropout_is_off_while_training(tmp_path, lora_dropout):
    cfg = ModelConfig(
        name_or_path=_tiny_llama_folder(tmp_path / "m"),
        dtype="float32",
        gradient_checkpointing=False,
        attn_implementation="eager",
        lora=LoraSettings(r=4, alpha=8.0, dropout=lora_dropout),
    )
    policy, *_ = load_policy(cfg, head_impl="torch", cache_dir=str(tmp_path / "cache"))
    hf = causal_lm(policy)
    dropouts = [(n, m.p) for n, m in hf.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert any(".lora_dropout." in n for n, _ in dropouts) == (lora_dropout > 0)  # PEFT made them (p > 0) ...
    assert all(p == 0.0 for _, p in dropouts), dropouts  # ... and they are off
    with torch.no_grad():  # an adapter that has trained (B = 0 at the start would hide the dropout on its input)
        for n, p in hf.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    hf.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = hf(input_ids=ids).logits, hf(input_ids=ids).logits
    assert torch.equal(first, second)
    hf.eval()
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, first)  # train mode computes what eval mode computes
