"""The trained model as a Hugging Face directory (AutoModelForCausalLM.from_pretrained loads it), with a model
card (clo_fast/training/card.py); with LoRA also the adapter on its own (PeftModel.from_pretrained loads it). The
Hub upload is clo_fast/training/hub.py's, after the ranks have parted.

    <output_dir>/hf_model/    merged model: sharded safetensors, config, generation config, tokenizer, README.md
    <output_dir>/hf_adapter/  LoRA runs only: adapter_config.json + adapter_model.safetensors (+ README.md)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from clo_fast.atomic import publish, staging_path
from clo_fast.config import RunConfig
from clo_fast.training.card import SUMMARY_FILE, add_evaluation_to_card, write_model_card
from clo_fast.training.distributed import barrier, rank

__all__ = ["SUMMARY_FILE", "add_evaluation_to_card", "export_hf", "write_hf_export"]


def export_hf(engine, cfg: RunConfig, tokenizer, summary: dict) -> Path:
    """Gather the 16-bit weights (ZeRO-3), then rank 0 writes the HF directory (and the adapter) and publishes.

    Collective: every rank takes part in gathering the ZeRO-3 weights."""
    out = Path(cfg.train.output_dir) / "hf_model"
    gathered = staging_path(Path(cfg.train.output_dir) / "gathered_weights")
    if rank() == 0:
        import shutil

        shutil.rmtree(gathered, ignore_errors=True)
        gathered.mkdir(parents=True)
    barrier()
    engine.save_16bit_model(str(gathered), "pytorch_model.bin")  # collective: every rank
    if rank() == 0:
        import shutil

        module = engine.module
        state_dict = torch.load(gathered / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        write_hf_export(
            state_dict,
            module.config,
            module.generation_config,
            tokenizer,
            cfg,
            summary,
            lora_base=summary["base_model"],
        )
        del state_dict
        shutil.rmtree(gathered, ignore_errors=True)
    barrier()  # the Hub upload comes later, on rank 0 after the ranks part (train.py: Run.finish)
    return out


@contextlib.contextmanager
def _without_hf_zero3():
    """transformers builds every model under ZeRO-3 partitioning while a DeepSpeed config is registered; the
    export model is a plain CPU one, so the registration is lifted for its construction and then restored."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def _model_from_state_dict(config, state_dict: dict, dtype: torch.dtype):
    """A CPU *ForCausalLM holding `state_dict`'s tensors (no second copy: built empty, tensors assigned)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with _without_hf_zero3(), init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    missing = [
        k for k in result.missing_keys if k != "lm_head.weight" or not getattr(config, "tie_word_embeddings", False)
    ]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"export: gathered weights do not match the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
    return model


def write_hf_export(state_dict: dict, config, generation_config, tokenizer, cfg: RunConfig, summary: dict, lora_base):
    """Write <output_dir>/hf_model (and hf_adapter with LoRA) from a gathered state dict with our policy's keys
    (the HF model's, plus PEFT's `.base_layer.` / `.lora_{A,B}.default.` names when model.lora is set).

    Each directory is staged and published atomically; LoRA adapters are merged with PEFT's merge_and_unload."""
    from clo_fast.model import DTYPES

    out = Path(cfg.train.output_dir) / "hf_model"
    dtype = DTYPES[cfg.model.dtype]
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    config.use_cache = True
    config.dtype = cfg.model.dtype
    if cfg.model.lora is not None:
        from peft import get_peft_model

        from clo_fast.model import lora_target_modules, peft_lora_config

        base = _model_from_state_dict(config, _base_weights(state_dict), dtype)
        lora_config = peft_lora_config(cfg.model.lora, lora_target_modules(base, cfg.model.lora), str(lora_base))
        base.name_or_path = str(lora_base)  # get_peft_model takes the adapter's base model from here
        with _without_hf_zero3():
            peft_model = get_peft_model(base, lora_config)
        adapter = {f"base_model.model.{k}": v for k, v in state_dict.items() if ".lora_" in k}
        result = peft_model.load_state_dict(adapter, strict=False, assign=True)
        if result.unexpected_keys or any(".lora_" in k for k in result.missing_keys):
            raise RuntimeError(f"export: adapter weights do not match: {result.unexpected_keys[:3]}")
        adapter_dir = out.with_name("hf_adapter")
        tmp = _fresh_staging(adapter_dir)
        peft_model.save_pretrained(str(tmp))
        write_model_card(tmp, cfg, summary, library="peft")
        publish(tmp, adapter_dir, "export")
        model = peft_model.merge_and_unload()
    else:
        model = _model_from_state_dict(config, state_dict, dtype)
    if generation_config is not None:
        model.generation_config = generation_config
    tmp = _fresh_staging(out)
    model.save_pretrained(str(tmp), max_shard_size=cfg.train.export_max_shard_size)
    tokenizer.save_pretrained(str(tmp))
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str))
    write_model_card(tmp, cfg, summary)
    publish(tmp, out, "export")
    return out


def _base_weights(state_dict: dict) -> dict:
    """The base model's weights out of a LoRA-injected state dict (PEFT's `.base_layer.` names undone). The
    adapted weights are copied: merging adds the adapter to them in place, and the caller's tensors stay as given."""
    return {
        k.replace(".base_layer.", "."): v.clone() if ".base_layer." in k else v
        for k, v in state_dict.items()
        if ".lora_" not in k
    }


def _fresh_staging(target: Path) -> Path:
    import shutil

    tmp = staging_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
