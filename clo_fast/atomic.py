"""Publishing directories and small files atomically: readers see the old version or the new one, never half.

Every writer of a directory (checkpoints, reference log-probs, the HF export, the text dataset, the
tokenization cache) stages it as `<parent>/.tmp-<name>` and renames it into place. A crash leaves only a
`.tmp-*` directory, which readers ignore and the next write of the same target removes.

Ownership: every folder clo_fast creates carries a marker file (`OWNER_MARKER`) naming its *kind* (one of
`OUTPUT_KINDS`: a text dataset, a training run, a reference cache, an evaluation, a comparison, an export ...).
An existing folder is only ever replaced or written into by an output of the same kind, and never while a live
process holds its lock: a folder the user made (or `.`, or `~`), or one holding another kind of output, is
refused, never deleted. `claim_output_dir` applies the rule to a run's output folder, `RunLock` keeps two runs
out of one folder, and `paths.check_disjoint_outputs` keeps output locations from nesting in each other.
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
    """An output folder cannot be used: not ours, another kind of output, held by another run, or not writable.
    Names the folder. (The commands report it like a config error: train.py, the data CLI through DataError.)"""


# kind → what it is called in messages; the marker of every folder clo_fast creates names one of these
OUTPUT_KINDS = {
    "data": "text dataset (data.output_dir)",
    "train_run": "training run (train.output_dir)",
    "reference_cache": "reference log-prob cache (train.reference_dir)",
    "evaluation": "evaluation report (eval.output_dir / --out-dir)",
    "compare": "comparison (compare --out-dir)",
    "export": "exported model (hf_model / hf_adapter)",
    "checkpoint": "training checkpoint",
    "tokenized_cache": "tokenized-data cache entry",
    "model_cache": "built demo model",
    "merged_model": "merged model (python -m clo_fast.merge_adapter)",
    "trl_export": "TRL-format dataset export (clo-fast data --export-format trl)",
}
# Markers written before kinds existed hold plain text: such a folder is taken for a kind only when it holds
# the file that kind always writes (a data folder its dataset_dict.json, a run its config.yaml ...).
_LEGACY_SIGNATURE = {
    "data": "dataset_dict.json",
    "train_run": "config.yaml",
    "reference_cache": "clo_ref_meta.json",
    "evaluation": "report.json",
    "export": "config.json",
    "checkpoint": "trainer_state.json",
    "tokenized_cache": "stats.json",
    "model_cache": "config.json",
    "merged_model": "config.json",
}


def _check_kind(kind: str) -> None:
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r} (one of {', '.join(OUTPUT_KINDS)})")


def marked_kind(path: str | os.PathLike) -> str | None:
    """The kind named by `path`'s marker; "" for a marker written before kinds existed; None without a marker."""
    marker = Path(path) / OWNER_MARKER
    if not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return ""
    return kind if kind in OUTPUT_KINDS else ""


def is_ours(path: str | os.PathLike, kind: str | None = None) -> bool:
    """True when clo_fast created `path` (as an output of `kind`, when given)."""
    found = marked_kind(path)
    if found is None or kind is None:
        return found is not None
    _check_kind(kind)
    return found == kind or (found == "" and (Path(path) / _LEGACY_SIGNATURE.get(kind, OWNER_MARKER)).is_file())


def enclosing_output(path: str | os.PathLike) -> tuple[Path, str] | None:
    """The nearest folder above `path` that clo_fast created (its path and kind, "" for an old marker), or None:
    an output placed there would nest inside another output."""
    for parent in Path(path).expanduser().absolute().parents:
        found = marked_kind(parent)
        if found is not None:
            return parent, found
    return None


def mark_ours(path: str | os.PathLike, kind: str) -> None:
    _check_kind(kind)
    note = "created by clo_fast; only an output of this kind replaces or writes into this folder"
    (Path(path) / OWNER_MARKER).write_text(json.dumps({"kind": kind, "note": note}) + "\n")


def live_lock_holder(folder: str | os.PathLike, *, ignore_own: bool = False) -> str | None:
    """'pid P on host H' when a process that may still be alive holds `folder`'s run lock, else None (no lock,
    or one whose process is gone on this host; with ignore_own, also one this process holds)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError):
        other = {}
    pid = other.get("pid")
    same_host = other.get("host") == socket.gethostname() and isinstance(pid, int)
    if same_host and (not _pid_alive(pid) or (ignore_own and pid == os.getpid())):
        return None
    return f"pid {other.get('pid', '?')} on host {other.get('host', '?')}"


def check_replaceable(target: str | os.PathLike, what: str = "output folder", kind: str | None = None) -> None:
    """Raise unless `target` is absent, an empty folder, or a folder clo_fast created as an output of `kind`
    that no live process holds (every writer calls this before staging anything). `kind=None` accepts any
    clo_fast folder (internal staging only)."""
    target = Path(target).expanduser()
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputDirError(f"{target}: {what} exists and is not a folder; choose another path")
    holder = live_lock_holder(target, ignore_own=True)
    if holder:
        raise OutputDirError(
            f"{target}: {what} is in use by a live run ({holder}, lock {target / LOCK_NAME}); wait for it, or "
            "choose another folder"
        )
    found = marked_kind(target)
    if found is None and not any(target.iterdir()):
        return
    if found is None:
        raise OutputDirError(
            f"{target}: {what} exists and was not created by clo_fast (no {OWNER_MARKER} file); refusing to "
            "replace it: choose a new or empty folder, or remove it yourself"
        )
    if is_ours(target, kind):
        return
    holds = OUTPUT_KINDS.get(found, "clo_fast output of unknown kind (written by an earlier version)")
    raise OutputDirError(
        f"{target}: {what} holds a {holds}, not a {OUTPUT_KINDS[kind]}; refusing to replace or write into it: "
        "choose another folder"
    )


def check_publishable(target: str | os.PathLike, what: str = "output folder", kind: str | None = None) -> None:
    """`check_replaceable` for a folder that is published whole (built elsewhere, then renamed into place): a
    symbolic link there would be replaced by the rename, not written through, so it is refused up front."""
    target = Path(target).expanduser()
    if target.is_symlink():
        raise OutputDirError(
            f"{target}: {what} is a symbolic link; this output is published by renaming a finished folder into "
            f"place, which cannot go through a link: give the real path ({target.resolve()})"
        )
    check_replaceable(target, what, kind)


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


def publish(staging: str | os.PathLike, target: str | os.PathLike, kind: str, *, replace: bool = True) -> Path:
    """Move a finished staging directory to `target`, marked as an output of `kind`; an existing target is
    replaced only when it holds the same kind (`check_replaceable`). With replace=False an existing target is kept
    (another process published the same content first) and the staging copy is discarded."""
    staging, target = Path(staging), Path(target).expanduser()
    if staging.is_dir() and not is_ours(staging, kind):
        mark_ours(staging, kind)
    if target.exists():
        if not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return target
        try:
            check_publishable(target, kind=kind)
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
def atomic_directory(
    target: str | os.PathLike, kind: str, *, per_process: bool = False, replace: bool = True
) -> Iterator[Path]:
    """`with atomic_directory(out, kind) as tmp:` write into the (new, empty) `tmp`; on leaving the block it
    becomes `out`, marked as an output of `kind`. On an exception the staging directory is removed and `out` is
    left as it was."""
    _check_kind(kind)
    if replace:
        check_publishable(target, kind=kind)  # before any work: a folder the user made is refused, not replaced
    staging = staging_path(target, per_process=per_process)
    shutil.rmtree(staging, ignore_errors=True)
    _make_dirs(staging.parent, "parent folder")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, target, kind, replace=replace)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a small file in one step (written, flushed to disk, then renamed over the old one)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- checksums
CHECKSUMS = "checksums.json"  # sha256 of every file of a published folder (checkpoints, tokenized cache)


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: str | os.PathLike) -> None:
    """`folder/checksums.json`: the sha256 of every file below it (written last, before publishing)."""
    folder = Path(folder)
    sums = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (CHECKSUMS, OWNER_MARKER)
    }
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def checksum_problem(folder: str | os.PathLike) -> str | None:
    """None when every file listed in checksums.json matches, else what is wrong, naming the file (a missing
    checksums.json included: callers decide whether an unverified folder may be used)."""
    folder = Path(folder)
    sums_file = folder / CHECKSUMS
    if not sums_file.is_file():
        return f"{sums_file} is missing"
    try:
        sums = json.loads(sums_file.read_text())
    except ValueError:
        return f"{sums_file} is not valid JSON"
    for rel, digest in sums.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} does not match its sha256 in {CHECKSUMS} (corrupted or truncated)"
    return None


# ------------------------------------------------------------------------------- a run's output folder
def claim_output_dir(path: str | os.PathLike, what: str, kind: str) -> Path:
    """Create `path` (or accept it when empty, or an output of the same `kind` no live run holds) and mark it as
    an output of `kind`; raise OutputDirError otherwise."""
    _check_kind(kind)
    path = Path(path).expanduser()
    check_replaceable(path, what, kind)
    _make_dirs(path, what)
    if marked_kind(path) != kind:
        mark_ours(path, kind)
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
                holder = live_lock_holder(self.path.parent)
                if holder is None:
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise OutputDirError(
                    f"{self.path.parent}: another run is using this folder (lock {self.path}: {holder}); wait "
                    "for it, or use another folder. If that run is dead (another host cannot be checked from "
                    "here), delete the lock file."
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


def build_in_own_process(
    target: str | os.PathLike, kind: str, module: str, what: str, args: tuple[str, ...] = ()
) -> Path:
    """Publish `target` (once, safe across processes: the first to publish wins) as built by
    `python -m <module> --out <staging> <args>` in a process of its own: a clo-fast command, so it pins the CPU
    numerics before it imports torch (clo_fast/numerics.py), whoever asks for the build."""
    import subprocess
    import sys

    with atomic_directory(target, kind, per_process=True, replace=False) as tmp:
        cmd = [sys.executable, "-m", module, "--out", str(tmp), *args]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return Path(target)
