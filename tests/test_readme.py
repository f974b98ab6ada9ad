"""The README's commands: every one it shows parses (its module's --help, its config loads, its files exist), and it
stays short enough for a newcomer. Files cited anywhere are checked by test_layout."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STARTS = ("pip ", "python ", "deepspeed ", "bash ", "clo-fast ", "torchrun ")


def readme_commands() -> list[list[str]]:
    """Each command of the README's indented code lines, split at && (one argv per command)."""
    out = []
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("    ") or not line.strip().startswith(STARTS):
            continue
        code = line.split("  #")[0].strip()
        for part in code.split("&&"):
            argv = shlex.split(part.strip())
            if argv:
                out.append(argv)
    return out


def test_the_readme_is_short_and_stays_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 180
    assert "../" not in text, "the README points outside the repository"


def test_the_readme_shows_the_two_commands():
    cmds = [" ".join(c) for c in readme_commands()]
    assert any("clo_fast/train.py" in c and "configs/demo.yaml" in c for c in cmds)
    assert any(c.startswith("python -m pytest") for c in cmds)


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    """pip's requirement files exist; a module or script answers --help; a training command's config loads with
    its --set flags (nothing is trained)."""
    from clo_fast.config import load_config

    tool = argv[0]
    if tool == "pip":
        for i, a in enumerate(argv):
            if a == "-r":
                assert (ROOT / argv[i + 1]).is_file(), argv[i + 1]
        return
    if tool in ("deepspeed", "torchrun") or "clo_fast/train.py" in argv:
        config = argv[argv.index("--config") + 1]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        load_config(ROOT / config, sets)
        return
    if tool == "python" and argv[1] == "-m" and argv[2] != "pytest":
        cmd = [sys.executable, "-m", argv[2], "--help"]
    elif tool == "python" and argv[1].endswith(".py"):
        assert (ROOT / argv[1]).is_file(), argv[1]
        cmd = [sys.executable, str(ROOT / argv[1]), "--help"]
    elif tool == "bash":
        assert (ROOT / argv[1]).is_file(), argv[1]
        assert subprocess.run(["bash", "-n", str(ROOT / argv[1])]).returncode == 0
        return
    elif tool == "ruff":  # the locked linter, as CI runs it
        cmd = [sys.executable, "-m", "ruff", argv[1], "--help"]
    elif tool == "clo-fast":
        cmd = ["clo-fast", *argv[1:2], "--help"]
    else:
        assert argv[:3] == ["python", "-m", "pytest"], argv
        return
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (argv, r.stderr[-2000:])
    assert re.search(r"usage:", r.stdout, re.I), argv
