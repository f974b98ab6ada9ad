"""Training callbacks (clo_fast/training/callbacks.py): loaded by import path, called in order, a bad path refused
before any work."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from clo_fast.training.callbacks import Callbacks, TrainerCallback, load_callback, parse_specs


@pytest.fixture
def callback_module(monkeypatch):
    mod = types.ModuleType("my_callbacks")

    class Double(TrainerCallback):
        def on_step_end(self, step, metrics):
            return {**metrics, "loss": metrics["loss"] * 2}

    class Record:  # no base class: only the events it defines are called
        seen: list = []

        def on_checkpoint_written(self, step, folder):
            self.seen.append((step, folder))

    mod.Double, mod.Record, mod.instance = Double, Record, Double()
    monkeypatch.setitem(sys.modules, "my_callbacks", mod)
    return mod


def test_callbacks_are_loaded_by_path_and_called_in_order(callback_module, tmp_path):
    cbs = Callbacks(["my_callbacks:Double", "my_callbacks:instance", "my_callbacks:Record"])
    out = cbs.step_end(3, {"loss": torch.tensor(1.5)})
    assert out["loss"].item() == 6.0  # doubled twice
    cbs.checkpoint_written(4, tmp_path)
    assert callback_module.Record.seen == [(4, tmp_path)]
    assert isinstance(load_callback("my_callbacks:instance"), callback_module.Double)
    assert Callbacks([]).step_end(1, {"loss": 1}) == {"loss": 1}


def test_the_environment_form_splits_on_commas():
    assert parse_specs(" a:B, c:D ,") == ["a:B", "c:D"] and parse_specs(None) == [] and parse_specs("") == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [("no_colon", "write it as module:attr"), ("no_such_module_xyz:A", "No module named"),
     ("json:NoSuchThing", "has no attribute")],
)  # fmt: skip
def test_a_bad_callback_path_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        load_callback(spec)


def test_train_refuses_a_callback_that_does_not_import_before_any_work(tmp_path):
    from clo_fast.config import ConfigError
    from clo_fast.train import main

    argv = ["--config", "demo", "--callback", "no_such_module_xyz:A", "--set", f"train.output_dir={tmp_path / 'r'}"]
    with pytest.raises(ConfigError, match=r"--callback: callback 'no_such_module_xyz:A'"):
        main(argv)
    assert not (tmp_path / "r").exists()
