"""Process set-up: the process group and device, rank-0 helpers, seeds, RNG state, test crash hook.

Rank and world size are read from torch.distributed when it is initialized, else 0 and 1, so every
helper here also works in a plain single process (tests, notebooks).
"""

from __future__ import annotations

import logging
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clo_fast.logs import get_logger

log = get_logger("train")


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def single_process_env() -> dict[str, str]:
    """What `deepspeed`, `torchrun` and `accelerate launch` put in the environment, for a plain
    `python clo_fast/train.py` run: one process, rank 0, a free local port. Without it DeepSpeed falls back to
    MPI discovery, which needs mpi4py and an MPI launcher. Empty when a launcher (or MPI) already set them."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return {}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _parent_command_line() -> list[str]:
    """The launching process's arguments (Linux /proc; empty elsewhere): `accelerate launch`'s own flags."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _flag_value(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        for name in names:
            if a == name and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
    return None


def launch_mismatch(env, cuda_devices: int, launcher_args: list[str]) -> str | None:
    """Why the processes the launcher started are not the ones it was asked for (None when they are), read from
    the launchers' own environment before the process group forms:
    - `accelerate launch --num_processes N` without --multi_gpu / --use_deepspeed on a machine without several
      GPUs runs its "simple" launcher: ONE process (it sets ACCELERATE_USE_CPU, and MASTER_ADDR only when asked
      for more than one, but no RANK), which would train as one rank with an N× smaller global batch;
    - torchrun / deepspeed / accelerate starting more processes on a node (LOCAL_WORLD_SIZE, LOCAL_SIZE, or a
      LOCAL_RANK) than it has CUDA devices: ranks without a device of their own."""
    if "ACCELERATE_USE_CPU" in env and "RANK" not in env and "MASTER_ADDR" in env:
        asked = _flag_value(launcher_args, "--num_processes", "--num-processes")
        what = f"--num_processes {asked}" if asked else "several processes"
        n = asked or "N"
        return (
            f"accelerate launch was asked for {what} but started this one process: without --multi_gpu (or "
            "--use_deepspeed) accelerate runs a single process where it finds fewer than two GPUs, and the run "
            f"would train as 1 rank with a smaller global batch. Launch {n} ranks with `deepspeed --num_gpus {n} "
            f"clo_fast/train.py ...`, `torchrun --nproc_per_node {n} clo_fast/train.py ...` or `accelerate launch "
            f"--multi_gpu --num_processes {n} clo_fast/train.py ...`; or one process with --num_processes 1"
        )
    if cuda_devices > 0:
        local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
        per_node = int(local) if local else int(env.get("LOCAL_RANK", "0")) + 1
        if per_node > cuda_devices:
            return (
                f"the launcher started {per_node} processes on this node but {cuda_devices} CUDA device(s) are "
                "visible (CUDA_VISIBLE_DEVICES); every rank needs a device of its own: launch at most "
                f"{cuda_devices} per node (deepspeed --num_gpus {cuda_devices}, torchrun --nproc_per_node "
                f"{cuda_devices}, accelerate launch --num_processes {cuda_devices})"
            )
    return None


def check_launch() -> None:
    """Stop with a clear error when the launcher did not start the processes it was asked for (launch_mismatch)."""
    from clo_fast.config import ConfigError

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    why = launch_mismatch(os.environ, cuda, _parent_command_line())
    if why:
        raise ConfigError(why)


# A torch-extension build lock (torch.utils.file_baton, which DeepSpeed's one-time CPU comm op is built under) that
# no live process holds is stale when its op is already built or when it is older than this: a process killed while
# building leaves it behind, and every later build of that op waits on it for ever, printing nothing.
EXTENSION_LOCK_STALE_S = 300


def torch_extensions_root() -> Path:
    """Where torch builds JIT extensions: TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py<ver>_<accel>
    (torch.utils.cpp_extension._get_build_directory's rule); each op builds in <root>/<name>/, under <name>/lock."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    version = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{version}_{accel}"


def _lock_holders(lock: Path) -> list[int] | None:
    """The pids of the processes that have `lock` open (torch's FileBaton keeps its lock file open while it holds
    it), from /proc; None where /proc cannot tell (not Linux)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    st = lock.stat()
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                fst = fd.stat()
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                holders.append(int(entry.name))
                break
    return holders


def clear_stale_extension_locks(root: Path | None = None, max_age_s: float = EXTENSION_LOCK_STALE_S) -> list[str]:
    """Before DeepSpeed builds (or loads) its JIT ops: each `<root>/<op>/lock` that no live process holds and whose
    op is already built (a .so beside it) or that is older than `max_age_s` is removed; one that may still be a
    build's is reported with its path and the command that removes it. Returns the log lines."""
    root = torch_extensions_root() if root is None else Path(root)
    notes = []
    for lock in sorted(root.glob("*/lock")) if root.is_dir() else []:
        try:
            age = time.time() - lock.stat().st_mtime
            holders = _lock_holders(lock)
        except FileNotFoundError:  # released meanwhile
            continue
        if holders:
            notes.append(f"{lock}: torch-extension build lock held by pid {', '.join(map(str, holders))}; waiting")
            continue
        built = sorted(p.name for p in lock.parent.glob("*.so"))
        if holders is not None and (built or age > max_age_s):
            why = f"its op is already built ({built[0]})" if built else f"it is {age:.0f} s old (> {max_age_s:.0f} s)"
            lock.unlink(missing_ok=True)
            notes.append(
                f"removed a stale torch-extension build lock {lock}: no live process holds it and {why} (left by "
                "a process killed while building)"
            )
            continue
        notes.append(
            f"{lock}: a torch-extension build lock, {age:.0f} s old; its build may still be running"
            + (" (no process list to check here)" if holders is None else "")
            + f". This run waits until it goes: if no build is running, remove it: rm {lock}"
        )
    return notes


def init_process_group(timeout_s: int | None = None) -> torch.device:
    """DeepSpeed's process group (env:// from the launcher, or one local process without one); returns this
    rank's device. `timeout_s`: how long a collective waits for the other ranks (None: DeepSpeed's default,
    DEEPSPEED_TIMEOUT minutes or 10)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.update(single_process_env())
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one process per host looks (the others may be waiting on it)
        for note in clear_stale_extension_locks():
            log.warning(note)
    if timeout_s is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    device = torch.device(accel.device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def log0(*args, level: int = logging.INFO) -> None:
    """A message from rank 0 only (the other ranks would repeat it), the args joined as print joins them."""
    if rank() == 0:
        log.log(level, " ".join(map(str, args)))


def warn0(*args) -> None:
    """A warning from rank 0 only (shown at every log level but error)."""
    log0(*args, level=logging.WARNING)


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def rank0_checked(fn):
    """Run the check `fn` on rank 0 only; a ConfigError it raises is raised on every rank (the others would
    otherwise wait at the next barrier until the timeout)."""
    from clo_fast.atomic import OutputDirError
    from clo_fast.config import ConfigError

    result, err = None, None
    if rank() == 0:
        try:
            result = fn()
        except (ConfigError, OutputDirError) as e:
            err = str(e)
    if world_size() > 1:
        box = [err]
        torch.distributed.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise ConfigError(err)
    return result


def computed_on_rank0(fn):
    """`fn()` on rank 0 only, its picklable result handed to every rank: for work every rank would repeat alike
    (hashing a model's weight files). An exception on rank 0 is raised on every rank, not left to a timeout."""
    value, err = None, None
    if rank() == 0:
        try:
            value = fn()
        except Exception as e:  # re-raised below, on every rank
            err = f"{type(e).__name__}: {e}"
            if world_size() == 1:
                raise
    if world_size() > 1:
        box = [(value, err)]
        torch.distributed.broadcast_object_list(box, src=0)
        value, err = box[0]
    if err:
        raise RuntimeError(f"on rank 0: {err}")
    return value


def h2d(t: torch.Tensor, device) -> torch.Tensor:
    """Host → device without a stream sync: a copy from pageable memory would synchronize, pinned does not."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(batch, device):
    """A batch on `device`: a dict of tensors, or a `clo_fast.packing.PackedBatch` (its own `.to`)."""
    if not isinstance(batch, dict):
        return batch.to(device)
    return {k: h2d(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain types only, so `torch.load(..., weights_only=True)` reads it
    back (a checkpoint folder is data: loading it never runs pickled code)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    st = {
        "python": [version, torch.tensor(py_state, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    version, py_state, gauss = st["python"]
    random.setstate((version, tuple(int(v) for v in py_state.tolist()), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = st["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.random.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def check_shared_output_dir(output_dir) -> None:
    """Every rank writes a probe file into `output_dir`; rank 0 must see all of them. Checkpoints are
    renamed and `latest` written by rank 0 only, and each rank decides alone whether cached reference
    log-probs exist, so the folder must be one filesystem shared by every node."""
    from pathlib import Path

    from clo_fast.config import ConfigError

    if world_size() == 1:
        return
    import socket
    import uuid

    token = [uuid.uuid4().hex if rank() == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    folder = Path(output_dir)
    # on a node that does not share rank 0's filesystem the folder is not there: made (and removed) here, so this
    # rank reaches the verdict too instead of failing alone and leaving the others waiting in the barrier
    made = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe-{token[0]}-rank{rank()}"
    probe.write_text(socket.gethostname())
    barrier()
    missing = [r for r in range(world_size()) if not (folder / f".probe-{token[0]}-rank{r}").is_file()]
    verdict = [missing if rank() == 0 else None]
    torch.distributed.broadcast_object_list(verdict, src=0)
    barrier()
    probe.unlink(missing_ok=True)
    if made and not any(folder.iterdir()):
        folder.rmdir()
    if verdict[0]:
        raise ConfigError(
            f"train.output_dir {folder}: rank 0 cannot see the files written there by rank(s) {verdict[0]}; "
            "the output folder must be on one filesystem shared by every node (checkpoints are published by "
            "rank 0 only)"
        )


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)
