"""Start-up checks of a training run: what its config asks of this machine and its accounts, checked before any
data, model or collective work (else it fails after training)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from clo_fast.config import ConfigError, RunConfig
from clo_fast.training.distributed import log0


def check_environment(cfg: RunConfig, config_path: Path) -> None:
    """What the config asks of this machine, checked before any work (else it fails after training): a Hub upload
    needs the Hub online and a valid token that may write to the repo's namespace; W&B logging needs an API key
    (unless WANDB_MODE is offline); float16 needs a CUDA device; a GGUF model needs its file and the gguf package."""
    from clo_fast.gguf_model import check_gguf_source
    from clo_fast.pretrained import model_folder_problem, trainer_checkpoint_note

    check_gguf_source(cfg.model, config_path)
    note = trainer_checkpoint_note(cfg.model.name_or_path)  # a Trainer checkpoint folder: said once, then used
    if note:
        log0(note)
    t = cfg.train
    problem = model_folder_problem(cfg.model.name_or_path)
    if problem:  # an adapter or a checkpoint: refused with the command that makes it a model folder
        raise ConfigError(f"{cfg.where('model.name_or_path', str(config_path))}: model.name_or_path: {problem}")
    if t.push_to_hub:
        from clo_fast.training.hub import check_hub_access

        check_hub_access(cfg, str(config_path))
    wandb_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if "wandb" in t.report_to and wandb_mode not in ("offline", "disabled", "dryrun"):
        import wandb

        # prompt=False: with no key, wandb.login would otherwise ask for one on a terminal and wait for ever
        # (a CI job under a pseudo-terminal hung there). verify=False: the key is read, not sent anywhere.
        try:
            logged_in = wandb.login(verify=False, prompt=False)
        except Exception as e:  # wandb.errors.UsageError: a malformed key or settings file
            logged_in, why = False, f"{e}"
        else:
            why = "no W&B API key found (set WANDB_API_KEY, or run `wandb login`)"
        if not logged_in:
            raise ConfigError(
                f"{cfg.where('train.report_to', str(config_path))}: train.report_to: wandb: {why} (or set "
                "WANDB_MODE=offline to log without an account)"
            )
    if cfg.model.dtype == "float16" and not torch.cuda.is_available():
        raise ConfigError(
            f"{cfg.where('model.dtype', str(config_path))}: model.dtype: float16 needs a CUDA device (DeepSpeed's "
            "fp16 mode); use float32 or "
            "bfloat16 on CPU"
        )


def check_head_device(cfg: RunConfig, config_path: Path, device: torch.device) -> None:
    """train.head_impl triton runs on CUDA (or under the Triton interpreter), never silently elsewhere."""
    if cfg.train.head_impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"{cfg.where('train.head_impl', str(config_path))}: train.head_impl: triton needs a CUDA device (or "
            "TRITON_INTERPRET=1); use auto or torch on CPU"
        )
