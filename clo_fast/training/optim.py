"""AdamW with decay on matrices only, and the LR schedule by TRL's / transformers' names (optim.lr_scheduler_type),
built by transformers' own scheduler functions so that a schedule means what it means in TRL."""

from __future__ import annotations

import math

import torch

from clo_fast.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length: optim.warmup_steps, or optim.warmup_ratio of all steps (rounded up), whichever is larger."""
    return max(cfg.warmup_steps, math.ceil(cfg.warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """transformers' scheduler `cfg.lr_scheduler_type` (a LambdaLR): linear warmup from 0 over `warmup_steps`
    updates, then linear to 0 | cosine to 0 | cosine to lr × min_lr_ratio | constant."""
    from transformers import get_scheduler

    extra = {"min_lr_rate": cfg.min_lr_ratio} if cfg.lr_scheduler_type == "cosine_with_min_lr" else None
    return get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    """(AdamW over the trainable parameters, the LR scheduler). Biases and norms (1-D) get no weight decay; under
    ZeRO-3 a parameter's local shape is empty, so its full shape (`ds_shape`) decides."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return optimizer, build_scheduler(optimizer, cfg, total_steps)
