"""W&B's own environment applies to the W&B logger (clo_fast.training.metrics.WandbLogger): WANDB_DIR decides where
its files go; without it they go under the run's output folder. Each case runs in a process of its own, as a
training run does (wandb keeps process-wide state: a second run in one process is not a fresh start)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOG_ONE_RECORD = """
import sys
from pathlib import Path
from clo_fast.config import load_config
from clo_fast.training.metrics import MetricsSink

out = Path(sys.argv[1])
cfg = load_config(None, [f"train.output_dir={out}", "train.report_to=[wandb]", "train.run_name=r1"])
out.mkdir()
sink = MetricsSink(cfg, 0)
sink.write(1, {"loss": 0.75})
sink.close()
"""


@pytest.mark.parametrize("wandb_dir", [True, False])
def test_wandb_dir_is_honoured(tmp_path, wandb_dir):
    elsewhere, out = tmp_path / "wandb_home", tmp_path / "run"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} | ({"WANDB_DIR": str(elsewhere)} if wandb_dir else {})
    r = subprocess.run(
        [sys.executable, "-c", LOG_ONE_RECORD, str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = (out / "wandb_run_id").read_text()
    pattern = f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"
    in_env_dir, in_output_dir = list(elsewhere.glob(pattern)), list(out.glob(pattern))
    if wandb_dir:
        assert len(in_env_dir) == 1 and not in_output_dir and not (out / "wandb").exists()
    else:
        assert len(in_output_dir) == 1 and not in_env_dir
    (log_file,) = in_env_dir or in_output_dir
    assert b"0.75" in log_file.read_bytes()
