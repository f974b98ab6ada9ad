"""clo_fast.training.optim: the learning-rate schedule and warmup."""

from __future__ import annotations

import pytest
import torch

from clo_fast.config import ConfigError, load_config


def test_lr_schedule():
    from clo_fast.training.optim import lr_multiplier

    assert [lr_multiplier(s, 10, 2, "cosine", 0.1) for s in (0, 1)] == [0.5, 1.0]
    assert lr_multiplier(2, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 0, "constant", 0.0) == 1.0


def test_warmup_ratio_sets_the_warmup_length():
    from clo_fast.config import OptimConfig
    from clo_fast.training.optim import build_optimizer, warmup_steps

    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 95) == 10  # ceil(9.5)
    assert warmup_steps(OptimConfig(warmup_steps=12, warmup_ratio=0.1), 95) == 12
    assert warmup_steps(OptimConfig(), 95) == 0
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, OptimConfig(lr=1.0, warmup_ratio=0.25, schedule="constant"), 8)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0])  # 2 warmup steps of 8
    with pytest.raises(ConfigError, match="optim.warmup_ratio"):
        load_config(None, ["optim.warmup_ratio=1.5"])
