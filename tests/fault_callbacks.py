"""Faults the end-to-end tests inject into a training run from outside, as a callback (the trainer has no test
hook): `helpers.fault_env(event, step)` registers `Faults` through CLO_FAST_CALLBACKS (tests/ on PYTHONPATH) and
says what to break in CLO_FAST_TEST_FAULT=<event>:<step>:
- kill_after_step: SIGKILL every rank once optimizer step <step> is done (before it is logged or saved)
- kill_in_save: SIGKILL every rank once checkpoint <step> is written but not yet published
- nan_loss: the loss of step <step> becomes NaN (a learning rate that diverges is refused by the config)."""

from __future__ import annotations

import os
import signal

ENV = "CLO_FAST_TEST_FAULT"


class Faults:
    def __init__(self):
        event, _, step = os.environ.get(ENV, "").partition(":")
        self.event, self.step = event, int(step or 0)

    def _kill(self, where: str) -> None:
        print(f"[test] killing rank {os.environ.get('RANK', '0')} at {where}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, step, metrics):
        if self.event == "kill_after_step" and step == self.step:
            self._kill(f"step {step}")
        if self.event == "nan_loss" and step == self.step:
            return {**metrics, "loss": metrics["loss"] * float("nan")}
        return None

    def on_checkpoint_written(self, step, folder):
        if self.event == "kill_in_save" and step == self.step:
            self._kill(f"checkpoint {step} ({folder.name})")
