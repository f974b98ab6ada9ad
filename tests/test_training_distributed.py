"""Launchers that did not start the processes they were asked for stop at start-up with a clear error
(clo_fast.training.distributed.launch_mismatch / check_launch), read from the launchers' own environment: no
several GPUs are needed to test it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clo_fast.training.distributed import launch_mismatch

ROOT = Path(__file__).resolve().parents[1]
# what each launcher puts in a worker's environment (accelerate 1.x, torchrun, deepspeed's launch.py)
ACCELERATE_SIMPLE_2 = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1"}
ACCELERATE_SIMPLE_1 = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}
TORCHRUN_4 = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1"}
DEEPSPEED_4 = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "4", "MASTER_ADDR": "127.0.0.1"}
ACCELERATE_MULTI_GPU_2 = {**TORCHRUN_4, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_accelerate_asked_for_several_processes_but_started_one():
    why = launch_mismatch(ACCELERATE_SIMPLE_2, 0, ["accelerate", "launch", "--num_processes", "2", "train.py"])
    assert "accelerate launch was asked for --num_processes 2 but started this one process" in why
    assert "deepspeed --num_gpus 2" in why and "accelerate launch --multi_gpu --num_processes 2" in why
    why = launch_mismatch(ACCELERATE_SIMPLE_2, 1, ["accelerate", "launch", "--num-processes=3", "train.py"])
    assert "--num_processes 3" in why
    # the number came from an accelerate config file, not the command line: still refused
    assert "asked for several processes" in launch_mismatch(ACCELERATE_SIMPLE_2, 0, [])


@pytest.mark.parametrize(
    ("env", "devices"),
    [
        ({}, 0),  # plain python: one process
        ({}, 1),
        (ACCELERATE_SIMPLE_1, 0),  # accelerate launch with one process
        (TORCHRUN_4, 0),  # CPU ranks (gloo): no device per rank needed
        (TORCHRUN_4, 4),
        (DEEPSPEED_4, 8),
        (ACCELERATE_MULTI_GPU_2, 2),  # accelerate --multi_gpu runs torchrun
    ],
)
def test_launches_that_got_what_they_asked_for_pass(env, devices):
    assert launch_mismatch(env, devices, ["accelerate", "launch", "--num_processes", "2"]) is None


@pytest.mark.parametrize(
    ("env", "devices", "asked"),
    [(TORCHRUN_4, 2, 4), (DEEPSPEED_4, 1, 4), ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, 2)],
)
def test_more_processes_per_node_than_cuda_devices_are_refused(env, devices, asked):
    why = launch_mismatch(env, devices, [])
    assert f"started {asked} processes on this node but {devices} CUDA device(s) are visible" in why


def test_accelerate_launch_with_two_processes_on_one_cpu_stops_at_start_up(tmp_path):
    """The issue's command, for real: accelerate's simple launcher starts one process; it exits 2 naming the fix,
    before the data stage (no output folder is made)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}  # no accelerate config file
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "2"]
        + [str(ROOT / "clo_fast" / "train.py")]
        + ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode != 0
    assert "[train] config error: accelerate launch was asked for --num_processes 2" in r.stderr, r.stderr[-3000:]
    assert "1 rank(s)" not in r.stdout and not (tmp_path / "run").exists()
