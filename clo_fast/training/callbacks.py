"""Callbacks: code a user (or a test) runs inside the training loop without editing it, as transformers'
TrainerCallback. Registered by import path (`--callback module:attr`, or CLO_FAST_CALLBACKS="a:B,c:D", which
reaches every rank through any launcher); `attr` is a class (instantiated without arguments) or an object.

Events, each called on every rank:
- `on_step_end(step, metrics)` after optimizer step `step` (1-based), before the step is logged or checked;
  it may return a new metrics dict (the device tensors of the step), else None.
- `on_checkpoint_written(step, folder)` once every rank has written its part of checkpoint `step` into its
  staging folder, before rank 0 publishes it (a checkpoint interrupted here must never be taken for complete).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

ENV_VAR = "CLO_FAST_CALLBACKS"


class TrainerCallback:
    """The events with nothing done: subclass and override the ones you need."""

    def on_step_end(self, step: int, metrics: dict) -> dict | None:
        return None

    def on_checkpoint_written(self, step: int, folder: Path) -> None:
        return None


def parse_specs(text: str | None) -> list[str]:
    """`a:B,c:D` (the environment variable's form) → ["a:B", "c:D"]."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def load_callback(spec: str) -> Any:
    """`module:attr` → the callback; a clear error (ValueError) names the spec when it cannot be found."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"callback {spec!r}: write it as module:attr (e.g. my_callbacks:LogGradients)")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"callback {spec!r}: {e} (is its folder on PYTHONPATH?)") from None
    return target() if isinstance(target, type) else target


class Callbacks:
    """The registered callbacks, called in registration order."""

    def __init__(self, specs: list[str]):
        self.specs = list(specs)
        self.items = [load_callback(s) for s in self.specs]

    def step_end(self, step: int, metrics: dict) -> dict:
        for cb in self.items:
            changed = cb.on_step_end(step, metrics) if hasattr(cb, "on_step_end") else None
            metrics = metrics if changed is None else changed
        return metrics

    def checkpoint_written(self, step: int, folder: Path) -> None:
        for cb in self.items:
            if hasattr(cb, "on_checkpoint_written"):
                cb.on_checkpoint_written(step, folder)
