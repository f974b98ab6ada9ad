"""Sweep tools' spelling of overrides (`--section.field=VALUE`, `--section.field VALUE`): the same config, and the
same checks, as `--set section.field=VALUE` (clo_fast.config.parse_args_with_overrides)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clo_fast.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def _train_config(*flags: str):
    from clo_fast.train import parse_args

    args = parse_args(["--config", DEMO, *flags])
    return load_config(args.config, args.set)


def test_sweep_flag_gives_the_same_config_as_set():
    via_set = to_dict(_train_config("--set", "clo.beta=0.2"))
    assert via_set["clo"]["beta"] == 0.2 != to_dict(load_config(DEMO))["clo"]["beta"]
    assert to_dict(_train_config("--clo.beta=0.2")) == via_set
    assert to_dict(_train_config("--clo.beta", "0.2")) == via_set


def test_several_sweep_flags_mixed_with_set_and_yaml_values():
    cfg = _train_config(
        "--optim.lr=1e-4", "--set", "optim.max_steps=7", "--model.lora", "{r: 4}", "--train.report_to=[jsonl]"
    )
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.model.lora.r, cfg.train.report_to) == (1e-4, 7, 4, ["jsonl"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clo.beta=-1"], r"--clo\.beta=-1: clo\.beta: must be in \(0, 10\]"),
        (["--clo.beta", "-1"], r"--clo\.beta -1: clo\.beta: must be in \(0, 10\]"),
        (["--clo.betta=0.2"], r"--clo\.betta=0\.2: clo\.betta: unknown key"),
        (["--optim.lr=[1"], r"--optim\.lr=\[1: the value is not valid YAML"),
    ],
)
def test_sweep_flags_get_the_checks_of_set_and_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        _train_config(*flags)


@pytest.mark.parametrize("flags", [["--bogus=1"], ["--nosection.beta=1"], ["--clo.beta"], ["--clo.beta", "--x"]])
def test_other_unknown_arguments_are_still_refused(flags, capsys):
    with pytest.raises(SystemExit) as e:
        _train_config(*flags)
    assert e.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_data_and_evaluate_commands_accept_the_sweep_spelling(tmp_path):
    """The same parser helper serves every command with --set: `python -m clo_fast.data` reports the error of a
    sweep flag exactly as for --set (no data is built)."""
    r = subprocess.run(
        [sys.executable, "-m", "clo_fast.data", "--config", DEMO, "--data.max_length=2", "--no-progress"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "--data.max_length=2: data.max_length: must be >= 8" in r.stderr
