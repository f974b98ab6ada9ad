"""clo_fast.atomic: directory writes that never replace a folder they did not create; the run lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clo_fast.atomic import OWNER_MARKER, OutputDirError, RunLock, atomic_directory, claim_output_dir, publish


def test_atomic_directory_refuses_to_replace_a_folder_it_did_not_create(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="not created by clo_fast"), atomic_directory(mine, "data") as tmp:
        (tmp / "x").write_text("new")
    assert (mine / "precious.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".tmp-*"))


def test_publish_refuses_a_foreign_target_and_replaces_its_own(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    staging = tmp_path / ".tmp-out"
    staging.mkdir()
    with pytest.raises(OutputDirError):
        publish(staging, target, "data")
    assert (target / "precious.txt").read_text() == "keep"
    # a folder we published is ours: replacing it is allowed
    other = tmp_path / "ours"
    for content in ("v1", "v2"):
        with atomic_directory(other, "data") as tmp:
            (tmp / "v").write_text(content)
    assert (other / "v").read_text() == "v2" and (other / OWNER_MARKER).is_file()


def test_output_dir_dot_parent_file_and_read_only_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "something.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not created by clo_fast"), atomic_directory(".", "data"):
        pass
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputDirError, match="parent is a file"):
        claim_output_dir(tmp_path / "afile" / "run", "train.output_dir", "train_run")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputDirError, match="permission denied|not writable"):
                claim_output_dir(ro / "run", "train.output_dir", "train_run")
        finally:
            ro.chmod(0o700)


def test_run_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / ".clo_fast.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path).acquire()  # stale: its pid is gone
    assert json.loads((tmp_path / ".clo_fast.lock").read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / ".clo_fast.lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(OutputDirError, match="another-host"):
        RunLock(tmp_path).acquire()
