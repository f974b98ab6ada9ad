"""Publishing directories and small files atomically: readers see the old version or the new one, never half.

Every writer of a directory (checkpoints, reference log-probs, the HF export, the text dataset, the
tokenization cache) stages it as `<parent>/.tmp-<name>` and renames it into place. A crash leaves only a
`.tmp-*` directory, which readers ignore and the next write of the same target removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".tmp-"


def staging_path(target: str | os.PathLike, *, per_process: bool = False) -> Path:
    """Where `target` is built before it is published. `per_process` adds the pid, for caches that several
    processes may fill at once (each stages its own copy; the first to publish wins)."""
    target = Path(target).expanduser()
    suffix = f"-{os.getpid()}" if per_process else ""
    return target.with_name(f"{STAGING_PREFIX}{target.name}{suffix}")


def publish(staging: str | os.PathLike, target: str | os.PathLike, *, replace: bool = True) -> Path:
    """Move a finished staging directory to `target`. With replace=False an existing target is kept (another
    process published the same content first) and the staging copy is discarded."""
    staging, target = Path(staging), Path(target).expanduser()
    if target.exists():
        if not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return target
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
    staging = staging_path(target, per_process=per_process)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
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
