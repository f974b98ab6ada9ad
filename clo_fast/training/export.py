"""The trained model as a Hugging Face directory (AutoModelForCausalLM.from_pretrained loads it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clo_fast.atomic import publish, staging_path
from clo_fast.config import RunConfig
from clo_fast.training.distributed import barrier, rank


def export_hf(engine, cfg: RunConfig, tokenizer, summary: dict) -> Path:
    """Gathered 16-bit weights (safetensors) + config + generation config + tokenizer + training summary.

    Collective: every rank takes part in gathering the ZeRO-3 weights; rank 0 writes and publishes."""
    out = Path(cfg.train.output_dir) / "hf_model"
    tmp = staging_path(out)
    if rank() == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_16bit_model(str(tmp), "pytorch_model.bin")  # collective: every rank
    if rank() == 0:
        from safetensors.torch import save_file

        module = engine.module
        sd = torch.load(tmp / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        if getattr(module.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del sd
        (tmp / "pytorch_model.bin").unlink()
        config = module.config
        config.use_cache = True
        config.dtype = cfg.model.dtype
        config.save_pretrained(tmp)
        if module.generation_config is not None:
            module.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "clo_training_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        publish(tmp, out)
    barrier()
    return out
