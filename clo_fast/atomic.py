"""Publishing directories and small files atomically: readers see the old version or the new one, never half.

Every writer of a directory (checkpoints, reference log-probs, the HF export, the text dataset, the
tokenization cache) stages it as `<parent>/.tmp-<name>` and renames it into place. A crash leaves only a
`.tmp-*` directory, which readers ignore and the next write of the same target removes.

Ownership: every published directory carries a marker file (`OWNER_MARKER`), and an existing target is only
ever replaced when it carries one, so a path pointing at a folder the user made (or `.`, or `~`) is refused,
never deleted. `claim_output_dir` applies the same rule to a run's output folder, and `RunLock` keeps two
runs out of one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".tmp-"
OWNER_MARKER = ".clo_fast_output"  # in every folder clo_fast created; only such folders are ever replaced
LOCK_NAME = ".clo_fast.lock"


class OutputDirError(ValueError):
    """An output folder cannot be used: not ours, held by another run, or not writable. Names the folder.
    (The commands report it like a config error: train.py, the data CLI through DataError.)"""


def is_ours(path: str | os.PathLike) -> bool:
    return (Path(path) / OWNER_MARKER).is_file()


def mark_ours(path: str | os.PathLike) -> None:
    (Path(path) / OWNER_MARKER).write_text("created by clo_fast; only folders holding this file are replaced\n")


def check_replaceable(target: str | os.PathLike, what: str = "output folder") -> None:
    """Raise unless `target` is absent, an empty folder, or a folder clo_fast created (the export and data
    writers call this before staging anything)."""
    target = Path(target).expanduser()
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputDirError(f"{target}: {what} exists and is not a folder; choose another path")
    if is_ours(target) or not any(target.iterdir()):
        return
    raise OutputDirError(
        f"{target}: {what} exists and was not created by clo_fast (no {OWNER_MARKER} file); refusing to "
        "replace it: choose a new or empty folder, or remove it yourself"
    )


def _make_dirs(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputDirError(f"{path}: cannot create the {what}: a parent is a file, not a folder") from None
    except PermissionError:
        raise OutputDirError(f"{path}: cannot create the {what}: permission denied") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"{path}: the {what} is not writable")


def staging_path(target: str | os.PathLike, *, per_process: bool = False) -> Path:
    """Where `target` is built before it is published. `per_process` adds the pid, for caches that several
    processes may fill at once (each stages its own copy; the first to publish wins)."""
    target = Path(target).expanduser().absolute()
    if not target.name or target.name == "." or target.parent == target:
        raise OutputDirError(f"{target}: not usable as an output folder (give a named folder, not '.' or '/')")
    suffix = f"-{os.getpid()}" if per_process else ""
    return target.with_name(f"{STAGING_PREFIX}{target.name}{suffix}")


def publish(staging: str | os.PathLike, target: str | os.PathLike, *, replace: bool = True) -> Path:
    """Move a finished staging directory to `target`. With replace=False an existing target is kept (another
    process published the same content first) and the staging copy is discarded."""
    staging, target = Path(staging), Path(target).expanduser()
    if staging.is_dir() and not is_ours(staging):
        mark_ours(staging)
    if target.exists():
        if not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return target
        try:
            check_replaceable(target)
        except OutputDirError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if replace or not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # lost a race to an identical cache entry
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, *, per_process: bool = False, replace: bool = True) -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into the (new, empty) `tmp`; on leaving the block it becomes
    `out`. On an exception the staging directory is removed and `out` is left as it was."""
    if replace:
        check_replaceable(target)  # before any work: a folder the user made is refused, not replaced later
    staging = staging_path(target, per_process=per_process)
    shutil.rmtree(staging, ignore_errors=True)
    _make_dirs(staging.parent, "parent folder")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, target, replace=replace)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a small file in one step (written, flushed to disk, then renamed over the old one)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- a run's output folder
def claim_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` (or accept it when empty or ours) and mark it as ours; raise OutputDirError otherwise."""
    path = Path(path).expanduser()
    check_replaceable(path, what)
    _make_dirs(path, what)
    if not is_ours(path):
        mark_ours(path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`<folder>/.clo_fast.lock` created exclusively (pid, host, start time): a second run into the folder
    is refused while the first lives. A lock whose pid is gone on this host is stale and taken over; a lock
    from another host cannot be checked, so it is reported (remove the file when that run is known dead)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    other = {}
                if (
                    other.get("host") == me["host"]
                    and isinstance(other.get("pid"), int)
                    and not _pid_alive(other["pid"])
                ):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise OutputDirError(
                    f"{self.path.parent}: another run is using this folder (lock {self.path}: pid "
                    f"{other.get('pid', '?')} on host {other.get('host', '?')}); wait for it, or use another "
                    "folder. If that run is dead (another host cannot be checked from here), delete the lock file."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise OutputDirError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
