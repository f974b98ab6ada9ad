"""clo_fast.training.export: the HF export (sharded safetensors, model card, LoRA merged and its adapter) and the
Hub upload."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PAD, examples, full_logits_logps, lora_policy, run_config, tiny_model

from clo_fast.config import load_config
from clo_fast.data import collate_clo
from clo_fast.model import build_policy


class TokenizerStub:
    """What the export asks of a tokenizer: save_pretrained writes its files."""

    def save_pretrained(self, directory):
        from pathlib import Path

        (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"stub": True}))


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
