"""Dropout is off while training, LoRA adapters' included, as TRL's disable_dropout does (clo_fast.model.load_policy):
the policy at step 0 must equal its reference, which is scored without dropout."""

from __future__ import annotations

import pytest
import torch

from clo_fast.config import LoraSettings, ModelConfig
from clo_fast.model import causal_lm, load_policy


def _tiny_llama_folder(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.3,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
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
