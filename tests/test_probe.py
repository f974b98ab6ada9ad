"""clo_fast.evaluate.probe: the fidelity probe during training."""

from __future__ import annotations

import pytest
import torch
from helpers import run_config

from clo_fast.model import build_policy


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
