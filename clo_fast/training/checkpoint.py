"""DeepSpeed checkpoints published atomically, and resume.

A checkpoint is written by every rank to `<output_dir>/checkpoints/.tmp-<tag>` and renamed to `<tag>` by
rank 0 only after every rank has finished writing; the `latest` file is replaced (atomically) after that.
A crash mid-write leaves only a `.tmp-*` directory, which `--resume` ignores and the next save removes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from clo_fast.atomic import STAGING_PREFIX, publish, staging_path, write_text_atomic
from clo_fast.config import ConfigError, RunConfig
from clo_fast.training.distributed import barrier, log0, maybe_crash, rank, rng_state, set_rng_state, world_size


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def save_checkpoint(engine, cfg: RunConfig, step: int, extra: dict) -> None:
    """DeepSpeed checkpoint + per-rank RNG state + trainer_state.json (step, world size, `extra`)."""
    root, tag = checkpoint_root(cfg), f"step_{step:08d}"
    staging = staging_path(root / tag)
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=staging.name, client_state={"clo_step": step}, save_latest=False)
    torch.save(rng_state(), staging / f"rng_state_rank{rank()}.pt")
    barrier()  # every rank has written its shard
    maybe_crash("in_save", step)
    if rank() == 0:
        state = {"step": step, "world_size": world_size(), **extra}
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
        publish(staging, root / tag)
        write_text_atomic(root / "latest", tag)
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - max(1, cfg.train.save_total_limit))]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    log0(f"checkpoint {root / tag}")


def load_checkpoint(engine, cfg: RunConfig, which: str) -> int:
    """Restore weights, optimizer, LR schedule and this rank's RNG; returns the step to continue from."""
    root = checkpoint_root(cfg)
    if which == "latest":
        if not (root / "latest").is_file():
            raise ConfigError(f"--resume: no complete checkpoint in {root} (no 'latest' file)")
        which = (root / "latest").read_text().strip()
    if which.startswith(STAGING_PREFIX) or not (root / which / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {which}: not a complete checkpoint in {root}")
    engine.load_checkpoint(str(root), tag=which, load_optimizer_states=True, load_lr_scheduler_states=True)
    state = json.loads((root / which / "trainer_state.json").read_text())
    if state.get("world_size") != world_size():
        log0(
            f"warning: checkpoint was written by {state.get('world_size')} ranks, now {world_size()}: "
            "the data order from here on differs from the original run"
        )
    rng = root / which / f"rng_state_rank{rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    log0(f"resumed from {root / which} at step {state['step']}")
    return int(state["step"])
