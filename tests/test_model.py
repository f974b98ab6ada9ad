"""clo_fast.model and clo_fast.demo_model: the demo model build, freezing, and the fused head against
`reference_clo_loss` (loss and gradients on the same batch). In-process, CPU, no DeepSpeed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from clo_fast.config import ConfigError, ModelConfig
from clo_fast.demo_model import demo_records, demo_texts, heldout_ids
from clo_fast.loss import clo_loss, reference_clo_loss
from clo_fast.model import FusedLogprobHead, apply_trainable_patterns, build_policy, load_policy
from clo_fast.pretrained import load_tokenizer

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
