"""clo_fast.training.optim: the learning-rate schedule and warmup."""

from __future__ import annotations

import math

import pytest
import torch

from clo_fast.config import LR_SCHEDULER_TYPES, ConfigError, OptimConfig, load_config
from clo_fast.training.optim import build_optimizer


def test_lr_schedule():  # transformers' schedules; their shapes are tested step by step below
    from clo_fast.config import OptimConfig
    from clo_fast.training.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(
        opt, OptimConfig(warmup_steps=2, lr_scheduler_type="cosine_with_min_lr", min_lr_ratio=0.1), 10
    )
    assert [sched.lr_lambdas[0](s) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert sched.lr_lambdas[0](10) == pytest.approx(0.1)


def test_warmup_ratio_sets_the_warmup_length():
    from clo_fast.config import OptimConfig
    from clo_fast.training.optim import build_optimizer, warmup_steps

    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 95) == 10  # ceil(9.5)
    assert warmup_steps(OptimConfig(warmup_steps=12, warmup_ratio=0.1), 95) == 12
    assert warmup_steps(OptimConfig(), 95) == 0
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(
        model, OptimConfig(lr=1.0, warmup_ratio=0.25, lr_scheduler_type="constant_with_warmup"), 8
    )
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.0])  # 2 warmup steps of 8 (transformers' warmup starts at 0)
    with pytest.raises(ConfigError, match="optim.warmup_ratio"):
        load_config(None, ["optim.warmup_ratio=1.5"])


# -------------------- optim.lr_scheduler_type: TRL's names, built by transformers' scheduler functions (clo_fast
def _expected(kind: str, step: int, total: int, warmup: int, floor: float) -> float:
    """The schedules as transformers (and so TRL) define them, written out: warmup from 0, then the decay."""
    if step < warmup:
        return step / warmup
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * cosine if kind == "cosine_with_min_lr" else cosine


@pytest.mark.parametrize("kind", LR_SCHEDULER_TYPES)
def test_each_schedule_follows_its_definition_step_by_step(kind):
    total, warmup, peak = 12, 3, 2e-3
    floor = 0.25 if kind == "cosine_with_min_lr" else 0.0
    cfg = OptimConfig(lr=peak, warmup_steps=warmup, lr_scheduler_type=kind, min_lr_ratio=floor)
    opt, sched = build_optimizer(torch.nn.Linear(4, 4), cfg, total)
    seen = []
    for _ in range(total + 1):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [peak * _expected(kind, s, total, warmup, floor) for s in range(total + 1)]
    assert seen == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_the_names_differ_where_they_should():
    def curve(kind, floor=0.0):
        opt, sched = build_optimizer(
            torch.nn.Linear(2, 2), OptimConfig(lr=1.0, lr_scheduler_type=kind, min_lr_ratio=floor), 10
        )
        return [sched.lr_lambdas[0](s) for s in range(11)]

    assert curve("cosine")[-1] == pytest.approx(0.0) and curve("linear")[-1] == pytest.approx(0.0)
    assert curve("cosine_with_min_lr", 0.1)[-1] == pytest.approx(0.1)
    assert curve("cosine_with_min_lr", 0.0) == pytest.approx(curve("cosine"))
    assert curve("linear")[5] == pytest.approx(0.5) and curve("cosine")[5] == pytest.approx(0.5)
    assert curve("linear")[2] == pytest.approx(0.8) != pytest.approx(curve("cosine")[2])
    assert curve("constant_with_warmup") == [1.0] * 11


def test_the_name_is_checked_at_load_and_the_old_field_says_what_replaced_it(tmp_path):
    assert load_config(None, ["optim.lr_scheduler_type=linear"]).optim.lr_scheduler_type == "linear"
    with pytest.raises(
        ConfigError, match=r"optim\.lr_scheduler_type: must be linear\|cosine\|.*, got 'cosine_with_restarts'"
    ):
        load_config(None, ["optim.lr_scheduler_type=cosine_with_restarts"])
    with pytest.raises(ConfigError, match=r"optim\.min_lr_ratio: applies to lr_scheduler_type cosine_with_min_lr"):
        load_config(None, ["optim.lr_scheduler_type=linear", "optim.min_lr_ratio=0.1"])
    old = tmp_path / "old.yaml"
    old.write_text("optim:\n  schedule: cosine\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: optim\.schedule: renamed optim\.lr_scheduler_type"):
        load_config(old)


def test_every_shipped_config_loads():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        assert load_config(path).optim.lr_scheduler_type in LR_SCHEDULER_TYPES, path
