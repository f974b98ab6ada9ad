"""DeepSpeed checkpoints published atomically, verified on resume; the run folder claimed and locked.

A checkpoint is written by every rank to `<output_dir>/checkpoints/.tmp-<tag>` and renamed to `<tag>` by
rank 0 only after every rank has finished writing; the `latest` file is replaced (atomically) after that.
A crash mid-write leaves only a `.tmp-*` directory, which `--resume` ignores and the next save removes.

Each checkpoint holds `checksums.json` (sha256 of every file) and the run config in trainer_state.json.
`--resume` verifies the checksums (naming a bad file and the newest good tag), states every config change
it accepts, refuses the ones it cannot honour and re-applies the optimizer hyper-parameters of the new
config (a new `optim.lr` re-bases the LR schedule).

Nothing is unpickled on resume: our own files are loaded with `torch.load(..., weights_only=True)`, and
DeepSpeed's model and optimizer shards too, through `WeightsOnlyCheckpointEngine` (DeepSpeed's torch engine with
weights_only loading and an allow-list of the few plain DeepSpeed records its shards hold). A shard holding any
other pickled object is refused, not executed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import torch

from clo_fast.atomic import (
    CHECKSUMS,
    STAGING_PREFIX,
    OutputDirError,
    RunLock,
    check_publishable,
    check_replaceable,
    checksum_problem,
    claim_output_dir,
    publish,
    staging_path,
    write_checksums,
    write_text_atomic,
)
from clo_fast.config import ConfigError, RunConfig, flatten_config, to_dict
from clo_fast.training.distributed import (
    barrier,
    log0,
    rank,
    rank0_checked,
    rng_state,
    set_rng_state,
    warn0,
    world_size,
)

# Changes --resume cannot honour: the saved shards would not fit, or mean another model.
# (a prefix: every field under it)
RESUME_REFUSED = ("model.name_or_path", "model.trainable_patterns", "model.dtype", "model.lora")


def checkpoint_root(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def checkpoint_tags(root: Path) -> list[str]:
    """Published checkpoints, oldest first (tags are zero-padded steps)."""
    return sorted(p.name for p in root.glob("step_*") if p.is_dir())


def prepare_output_dir(cfg: RunConfig, resume: str | None) -> RunLock:
    """Rank 0, before anything is written: the folder must be new, empty or a training run's (an unmarked folder
    holding files is never adopted, whatever it holds); a folder holding checkpoints needs --resume or
    train.overwrite_output_dir; takes the run lock (released at exit)."""
    import atexit

    from clo_fast.training.reference import reference_root

    out = claim_output_dir(cfg.train.output_dir, "train.output_dir", "train_run")
    for name in ("hf_model", "hf_adapter"):  # the export replaces them at the end: refused now, not then
        check_publishable(out / name, f"train.output_dir/{name}", "export")
    check_replaceable(reference_root(cfg), "train.reference_dir", "reference_cache")
    lock = RunLock(out).acquire()
    atexit.register(lock.release)
    root = checkpoint_root(cfg)
    tags = checkpoint_tags(root) if root.is_dir() else []
    if root.is_dir() and not os.access(root, os.W_OK | os.X_OK):  # found now, not at the first save
        lock.release()
        raise OutputDirError(
            f"{root}: the checkpoints folder is not writable (permission denied; owner uid {root.stat().st_uid}, "
            f"mode {stat.filemode(root.stat().st_mode)}): make it writable (chmod u+w {root}), or choose another "
            "train.output_dir"
        )
    if tags and not resume:
        if not cfg.train.overwrite_output_dir:
            lock.release()
            raise OutputDirError(
                f"{out}: holds checkpoints of an earlier run ({', '.join(tags)}); pass --resume to continue it, "
                "set train.overwrite_output_dir: true to start over (its checkpoints are removed), or choose "
                "another train.output_dir"
            )
        shutil.rmtree(root)  # explicitly asked for; the folder is ours
        log0(f"train.overwrite_output_dir: removed the earlier checkpoints {', '.join(tags)}")
    return lock


def verify_checkpoint(folder: Path, *, allow_unverified: bool = False) -> str | None:
    """None when every file matches checksums.json, else what is wrong (naming the file). A checkpoint without
    checksums.json is refused unless `allow_unverified` (train.py --resume-unverified)."""
    if not (folder / "trainer_state.json").is_file():
        return f"{folder / 'trainer_state.json'} is missing"
    if not (folder / CHECKSUMS).is_file():
        if allow_unverified:
            warn0(f"warning: {folder} has no {CHECKSUMS}: resuming from unverified files (--resume-unverified)")
            return None
        return (
            f"{folder / CHECKSUMS} is missing (written by an older clo_fast, or removed), so its files cannot be "
            "verified; to resume from it knowingly, add --resume-unverified"
        )
    return checksum_problem(folder)


def rotate_checkpoints(root: Path, newest: str, keep: int) -> list[str]:
    """Remove checkpoints older than `newest` beyond the `keep` most recent; never `newest` or a later one."""
    older = [t for t in checkpoint_tags(root) if t < newest]
    doomed = older[: max(0, len(older) - (max(1, keep) - 1))]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def save_checkpoint(engine, cfg: RunConfig, step: int, extra: dict, callbacks=None) -> None:
    """DeepSpeed checkpoint + per-rank RNG state + trainer_state.json (step, world size, config, `extra`)
    + checksums.json. `callbacks` (training/callbacks.py) hear when every rank's part is written, before it is
    published."""
    root, tag = checkpoint_root(cfg), f"step_{step:08d}"
    staging = staging_path(root / tag)
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=staging.name, client_state={"clo_step": step}, save_latest=False)
        torch.save(rng_state(), staging / f"rng_state_rank{rank()}.pt")
    except PermissionError as e:
        raise OSError(
            f"{staging}: writing checkpoint {tag} failed on rank {rank()}: permission denied ({e.filename or e}); "
            "make the folder writable, then --resume. The published checkpoints are untouched"
        ) from e
    except (OSError, RuntimeError) as e:  # disk full surfaces as "basic_ios::clear" from torch's writer
        if not all(os.access(d, os.W_OK | os.X_OK) for d in (root, staging) if d.is_dir()):
            raise OSError(
                f"{staging}: writing checkpoint {tag} failed on rank {rank()}: permission denied (the folder is not "
                "writable); make it writable, then --resume. The published checkpoints are untouched"
            ) from e
        free = shutil.disk_usage(root).free / 2**30
        raise OSError(
            f"{staging}: writing checkpoint {tag} failed on rank {rank()} ({e}); {free:.2f} GiB free on that "
            "filesystem. The published checkpoints are untouched: free space, then --resume"
        ) from e
    barrier()  # every rank has written its shard
    if callbacks is not None:
        callbacks.checkpoint_written(step, staging)
    if rank() == 0:
        state = {"step": step, "world_size": world_size(), "config": to_dict(cfg), **extra}
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
        write_checksums(staging)
        publish(staging, root / tag, "checkpoint")
        write_text_atomic(root / "latest", tag)
        rotate_checkpoints(root, tag, cfg.train.save_total_limit)
    barrier()
    log0(f"checkpoint {root / tag}")


def config_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """{dotted field: (saved value, new value)} for every field that differs."""
    a, b = flatten_config(saved), flatten_config(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_compatible(state: dict, cfg: RunConfig, folder: Path) -> dict[str, tuple]:
    """Raise ConfigError for what a resume cannot honour; return the config changes it accepts."""
    if state.get("world_size") != world_size():
        raise ConfigError(
            f"--resume {folder}: the checkpoint was written by {state.get('world_size')} ranks, this run has "
            f"{world_size()}: ZeRO-3 shards are per rank; resume with {state.get('world_size')} ranks (or convert "
            "the checkpoint to a universal one with DeepSpeed's ds_to_universal)"
        )
    changes = config_changes(state.get("config") or {}, to_dict(cfg)) if "config" in state else {}
    refused = [k for k in changes if any(k == r or k.startswith(r + ".") for r in RESUME_REFUSED)]
    if refused:
        raise ConfigError(
            f"--resume {folder}: cannot resume with a changed "
            + "; ".join(f"{k} ({changes[k][0]!r} → {changes[k][1]!r})" for k in refused)
        )
    for k, (old, new) in changes.items():
        log0(f"resume: accepted config change {k}: {old!r} → {new!r}")
    return changes


def apply_optimizer_config(engine, cfg: RunConfig, changes: dict) -> None:
    """The checkpoint restored the old optimizer hyper-parameters and the schedule's base LR: put the new
    config's in. A new LR re-bases the schedule (same step, same multiplier, new peak)."""
    o = cfg.optim
    groups = engine.optimizer.param_groups
    if "optim.weight_decay" in changes and changes["optim.weight_decay"][0] == 0:
        raise ConfigError("--resume: optim.weight_decay changed from 0: the decayed parameter group is unknown")
    for g in groups:
        g["betas"], g["eps"] = tuple(o.betas), o.eps
        if "optim.weight_decay" in changes and g["weight_decay"] != 0:
            g["weight_decay"] = o.weight_decay
    sched = engine.lr_scheduler
    if sched is not None and hasattr(sched, "base_lrs"):
        sched.base_lrs = [o.lr for _ in groups]
        for g, lmbda in zip(groups, sched.lr_lambdas, strict=True):
            g["lr"] = o.lr * lmbda(sched.last_epoch)


TAG_PATTERN = re.compile(r"step_\d+")


def resolve_tag(cfg: RunConfig, which: str) -> Path:
    """The checkpoint folder `--resume [TAG]` names: `latest` (the file's content) or a tag, which must be a
    published checkpoint directly in this run's own checkpoints/ folder (no path, no link leading out of it)."""
    root = checkpoint_root(cfg)
    source = "--resume"
    if which == "latest":
        if not (root / "latest").is_file():
            raise ConfigError(f"--resume: no complete checkpoint in {root} (no 'latest' file)")
        which, source = (root / "latest").read_text().strip(), f"{root / 'latest'} names"
    if not TAG_PATTERN.fullmatch(which):
        raise ConfigError(
            f"{source} {which!r}: not a checkpoint tag (step_<N>, one of {root}'s own: "
            f"{', '.join(checkpoint_tags(root)) if root.is_dir() else 'none'})"
        )
    folder = root / which
    if folder.is_symlink() or folder.resolve().parent != root.resolve():
        raise ConfigError(f"{source} {which}: {folder} leads outside {root}; resume only from this run's checkpoints")
    if not (folder / "trainer_state.json").is_file():
        raise ConfigError(f"{source} {which}: not a complete checkpoint in {root}")
    return folder


def prepare_resume(cfg: RunConfig, which: str, *, allow_unverified: bool = False) -> tuple[Path, dict, dict]:
    """At start-up, before data, model and reference pass: the checkpoint folder, verified (rank 0 hashes, every
    rank gets the verdict), its trainer state, and the config changes it accepts (those it cannot honour raise)."""
    root = checkpoint_root(cfg)
    folder = resolve_tag(cfg, which)

    def verify() -> None:
        problem = verify_checkpoint(folder, allow_unverified=allow_unverified)
        if not problem:  # our own small files are read now (weights_only), not after data, model and reference
            for rng in sorted(folder.glob("rng_state_rank*.pt")):
                load_rng_state(rng)
        if problem:
            tags = reversed(checkpoint_tags(root))
            good = [t for t in tags if t != folder.name and verify_checkpoint(root / t) is None]
            hint = f"the newest good checkpoint is {good[0]}: --resume {good[0]}" if good else "no intact checkpoint"
            raise ConfigError(f"--resume {folder.name}: {problem}; {hint}")

    rank0_checked(verify)  # one reader of the (shared) folder; every rank gets the verdict
    state = read_trainer_state(folder)
    return folder, state, check_resume_compatible(state, cfg, folder)


def read_trainer_state(folder: Path) -> dict:
    """trainer_state.json, its fields checked (ConfigError naming the file and the field): a valid checksum only
    says the file is the one that was saved, not that it holds what a resume needs."""
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {path}: not readable JSON ({e})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"--resume: {path}: holds a {type(state).__name__}, not a JSON object")
    for field in ("step", "world_size"):
        value = state.get(field)
        if type(value) is not int or value < (0 if field == "step" else 1):
            raise ConfigError(
                f"--resume: {path}: field {field!r} is {value!r}, not a{' non-negative' if field == 'step' else ''} "
                "whole number; the checkpoint is damaged: resume from another tag"
            )
    if "config" in state and not isinstance(state["config"], dict):
        raise ConfigError(f"--resume: {path}: field 'config' is not a JSON object; resume from another tag")
    return state


def load_rng_state(path: Path):
    """A rank's RNG state, loaded with weights_only: anything else pickled in it is refused (ConfigError naming the
    file), not run."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ConfigError(
            f"--resume: {path}: not a plain RNG state (it holds a pickled object that is not a tensor, or is "
            f"damaged), so it is not loaded: {str(e).splitlines()[0][:200]}; resume from another tag"
        ) from None


def check_resume_progress(state: dict, total_steps: int, folder: Path) -> None:
    """A resume must have steps left to run: one at or past the configured total would train nothing (and
    rewrite the run's final metrics and export); a total below the checkpoint's step would go backwards."""
    step = state["step"]  # an int (read_trainer_state)
    if step >= total_steps:
        raise ConfigError(
            f"--resume {folder.name}: the checkpoint is at step {step} and this config trains {total_steps} steps "
            f"in all (optim.max_steps, or optim.epochs × steps per epoch): nothing is left to train. Raise "
            f"optim.max_steps above {step} to continue training; the finished run is left as it is"
        )


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19's ZeRO shards pickle (found by reading the pickles' globals): plain
    records, no code runs when they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def weights_only_checkpoint_engine(original=None):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` (its own loads with full unpickling):
    installed on the engine before `load_checkpoint`, every shard it reads goes through it. It takes over the
    `original` engine's settings (its serialization format above all: the export reads the saved model back
    with mmap, which needs the zipfile format the engine was configured with)."""
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ConfigError(
                    f"--resume: {path} holds a pickled object that is not a tensor or a known DeepSpeed record, so "
                    f"it is not loaded (loading it could run code): {str(e).splitlines()[-1][:300]}"
                ) from None

    engine = WeightsOnlyCheckpointEngine()
    if original is not None:
        engine.__dict__.update(vars(original))
    return engine


def load_checkpoint(engine, cfg: RunConfig, which: str, *, allow_unverified: bool = False, prepared=None) -> int:
    """Verify (unless `prepared` by `prepare_resume`), then restore weights, optimizer, LR schedule and this
    rank's RNG; returns the step to continue from."""
    folder, state, changes = prepared or prepare_resume(cfg, which, allow_unverified=allow_unverified)
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine.checkpoint_engine)  # no unpickling on load
    engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    apply_optimizer_config(engine, cfg, changes)
    rng = folder / f"rng_state_rank{rank()}.pt"
    if rng.is_file():
        set_rng_state(load_rng_state(rng))
    log0(f"resumed from {folder} at step {state['step']}")
    return int(state["step"])


def write_run_record(out_dir: Path, cfg: RunConfig, data_summary: dict) -> None:
    """The run's record of how it was trained, written once the run is accepted: config.yaml and the data stage's
    rejected pairs (data_rejects.jsonl)."""
    import yaml

    from clo_fast.data.build import REJECTS_FILE, rejects_jsonl

    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    rejects = out_dir / f"data_{REJECTS_FILE}"
    rejects.write_text(rejects_jsonl(data_summary), encoding="utf-8")
    rejected = data_summary["quality"]["rejected"]
    if rejected:
        log0(
            f"data: the translation quality gate dropped {sum(rejected.values())} of "
            f"{data_summary['quality']['checked']} pairs ({rejected}); they are in {rejects}"
        )
