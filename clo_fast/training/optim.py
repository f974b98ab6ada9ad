"""AdamW with decay on matrices only, and the LR schedule: linear warmup, then cosine / linear / constant."""

from __future__ import annotations

import math

import torch

from clo_fast.config import OptimConfig


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR factor for the update after `step` completed updates: linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length: optim.warmup_steps, or optim.warmup_ratio of all steps (rounded up), whichever is larger."""
    return max(cfg.warmup_steps, math.ceil(cfg.warmup_ratio * total_steps))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    """(AdamW over the trainable parameters, LambdaLR). Biases and norms (1-D) get no weight decay; under
    ZeRO-3 a parameter's local shape is empty, so its full shape (`ds_shape`) decides."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    warmup = warmup_steps(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
