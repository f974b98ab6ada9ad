"""The project as a fresh machine installs it: no folder of ours shadows an installed package, and the locked
versions the README and CI use are the ones installed."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_pypi_kernels_package_is_installed_not_our_folder():
    """transformers imports the PyPI package `kernels` when it loads a model class; the test extra installs it so
    that this suite runs where the clash happens."""
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin, "the PyPI package `kernels` is not installed (it is in the test extra)"
    assert ROOT not in Path(spec.origin).resolve().parents, spec.origin
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must not be an importable package"


def test_commands_started_in_the_repository_root_import_transformers_models():
    """A process whose current folder is the root has that folder first on sys.path: transformers' Llama, the
    evaluator, the compare command and a benchmark must still import (main failed here with `cannot import name
    'CUDAProperties' from 'kernels'`)."""
    code = (
        "import kernels, transformers\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "import clo_fast.evaluate.run, clo_fast.compare, clo_kernels\n"
        "from transformers.integrations import hub_kernels\n"
        "print(kernels.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(ROOT / "kernels") not in out.stdout
    for argv in (["-m", "clo_fast.compare", "--help"], [str(ROOT / "benchmarks" / "bench_step.py"), "--help"]):
        run = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (argv, run.stderr[-3000:])


def test_no_code_puts_the_repository_first_on_sys_path():
    """An installed project needs no sys.path surgery: inserting the root first is what let kernels/ shadow."""
    wrong = []
    for path in [*ROOT.glob("clo_fast/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("kernels/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "insert":
                target = ast.unparse(node.func.value)
                if target == "sys.path":
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not wrong, wrong


def test_installed_versions_are_the_locked_ones():
    """CI installs requirements/cpu.txt into a fresh environment: every pin is what is installed (a drift means the
    lock was not used, or a later install step moved a package)."""
    from helpers import locked_versions

    pins = locked_versions()
    assert {"transformers", "deepspeed", "datasets", "kernels", "gguf", "ruff"} <= set(pins)
    drift = {}
    for name, want in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != want:
            drift[name] = (want, have)
    if drift and os.environ.get("CLO_FAST_UNLOCKED") == "1":
        pytest.skip(f"scripts/check_latest.sh installs the newest releases on purpose; differing: {drift}")
    if drift:
        raise AssertionError(f"installed versions differ from requirements/cpu.txt (locked, installed): {drift}")


def test_readme_states_the_locked_versions():
    """The README's version sentences are the lock's: re-locking without re-measuring fails here."""
    from helpers import README, locked_torch, locked_versions

    pins = locked_versions()
    stated = f"torch {locked_torch()}, transformers {pins['transformers']}, deepspeed {pins['deepspeed']}"
    text = README.read_text(encoding="utf-8")
    found = set(re.findall(r"torch [\d.]+, transformers [\d.]+, deepspeed [\d.]+", text))
    assert found == {stated}, f"README states {found}; the lock is {stated}"
    assert f"torch=={locked_torch()}" in text and "requirements/cpu.txt" in text
