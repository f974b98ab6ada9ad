"""The project as a fresh machine installs it: no folder of ours shadows an installed package, and the locked
versions the README and CI use are the ones installed."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
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


@pytest.mark.slow
def test_a_built_wheel_installed_outside_the_repository_trains_the_shipped_demo(tmp_path, demo_cache, demo_model_dir):
    """`python -m build` → the wheel into a fresh venv (the locked packages, no source checkout) → `clo-fast train
    --config demo` from a folder outside the repository: the config, the DeepSpeed JSON and the demo data come from
    the package. The demo model is the session's (a cache folder, not code), so the test spends its time on the
    install and two steps."""
    import shutil

    from helpers import locked_torch

    dist = tmp_path / "dist"
    # sdist first, the wheel from the unpacked sdist: no stale file in the checkout's build/ can enter it
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)]
    out = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = dist.glob("clo_fast-*.whl")
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    # the wheel with its declared dependencies at the locked versions (uv, where installed, is much faster here)
    pins = [str(wheel), f"torch=={locked_torch()}", "-c", str(ROOT / "requirements" / "cpu.txt")]
    if shutil.which("uv"):
        links = [a for d in os.environ.get("PIP_FIND_LINKS", "").split() for a in ("--find-links", d)]
        steps = [["uv", "venv", "-q", "--python", sys.executable, str(venv)]]
        steps += [["uv", "pip", "install", "-q", *links, *pins]]
    else:
        steps = [[sys.executable, "-m", "venv", str(venv)], [str(py), "-m", "pip", "install", "-q", *pins]]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    for cmd in steps:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**env, "VIRTUAL_ENV": str(venv)})
        assert out.returncode == 0, (cmd, out.stderr[-3000:])
    work = tmp_path / "elsewhere"
    work.mkdir()
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    where = subprocess.run([str(py), "-c", "import clo_fast; print(clo_fast.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout, where.stdout + where.stderr
    sets = ["optim.max_steps=2", f"data.cache_dir={demo_cache}", "train.run_evaluation=false", "train.eval_steps=0"]
    cmd = [str(venv / "bin" / "clo-fast"), "train", "--config", "demo", *(a for s in sets for a in ("--set", s))]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    launched = run.stdout.splitlines()[0]
    assert launched.startswith(f"[clo-fast] {py} {venv}/lib/") and "/site-packages/clo_fast/train.py" in launched
    steps_logged = [json.loads(line).get("step") for line in (work / "outputs/demo/run/metrics.jsonl").open()]
    assert {1, 2} <= set(steps_logged)
    assert (work / "outputs/demo/run/hf_model/config.json").is_file()
