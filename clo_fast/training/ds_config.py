"""The DeepSpeed ZeRO-3 JSON, with batch sizes, precision and clipping filled from the run config."""

from __future__ import annotations

import json
from pathlib import Path

from clo_fast.config import ConfigError, RunConfig
from clo_fast.paths import configs_dir

# the folder holding configs/: the repository in a checkout, the package in a wheel (`configs/ds_zero3.json`, the
# shipped configs' own spelling, resolves in both)
SHIPPED_ROOT = Path(configs_dir()).resolve().parent


def resolve_file(path: str, config_path: Path) -> Path:
    """A path from the config: as given (cwd), else next to the config file, else among the shipped files
    (the repository's in a checkout, the package's in a wheel install)."""
    for cand in (Path(path), config_path.parent / path, SHIPPED_ROOT / path):
        if cand.is_file():
            return cand
    raise ConfigError(f"{config_path}: train.deepspeed_config: file not found: {path}")


def build_ds_config(cfg: RunConfig, config_path: Path, world: int) -> dict:
    """The ZeRO-3 JSON; a key the run config sets may be absent or "auto" in the JSON, never different."""
    src = resolve_file(cfg.train.deepspeed_config, config_path)
    try:
        ds = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{src}: not valid JSON: {e}") from None
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 3) != 3:
        raise ConfigError(f"{src}: zero_optimization.stage: the trainer needs ZeRO stage 3, got {zero.get('stage')}")
    zero["stage"] = 3
    zero["stage3_gather_16bit_weights_on_model_save"] = True  # the HF export needs gathered weights
    optim = cfg.optim
    filled = {
        "train_micro_batch_size_per_gpu": optim.micro_batch_examples,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "train_batch_size": optim.micro_batch_examples * optim.gradient_accumulation_steps * world,
        "gradient_clipping": optim.max_grad_norm,
    }
    for key, value in filled.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(
                f'{src}: {key}: set from the run config (optim.*) — remove it or use "auto" '
                f"(JSON has {ds[key]}, run config gives {value})"
            )
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{src}: {key}: the trainer builds the optimizer and LR schedule from optim.*; remove it")
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}  # DeepSpeed mixed precision follows model.dtype
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.model.dtype == "float16"}
    ds["zero_allow_untested_optimizer"] = True  # torch.optim.AdamW
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
