"""clo_fast.numerics: which CPU numerics a process gets, and that a clo-fast command really runs with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clo_fast import numerics

ROOT = Path(__file__).resolve().parent.parent
AVX2_CPU = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2 avx512f\n"
OLD_CPU = "processor\t: 0\nflags\t\t: fpu sse sse2 sse4_2 avx\n"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(numerics, "gpu_visible", lambda environ=None: False)


def test_decide_pins_avx2_on_an_avx2_cpu_and_portable_kernels_without_it(no_gpu):
    assert numerics.decide({}, cpuinfo=AVX2_CPU) == ("avx2", numerics.PINNED_ENV)
    assert numerics.decide({}, cpuinfo=OLD_CPU) == ("portable", numerics.PORTABLE_ENV)
    assert numerics.decide({numerics.SWITCH: "pinned"}, cpuinfo=AVX2_CPU)[0] == "avx2"


def test_native_switch_and_gpu_leave_the_environment_alone(monkeypatch):
    env = {numerics.SWITCH: "native", "ATEN_CPU_CAPABILITY": "avx512"}
    assert numerics.pin_cpu_numerics(env, cpuinfo=AVX2_CPU)["mode"] == "native"
    assert env["ATEN_CPU_CAPABILITY"] == "avx512" and "MKL_CBWR" not in env
    monkeypatch.setattr(numerics, "gpu_visible", lambda environ=None: True)
    env = {}
    assert numerics.pin_cpu_numerics(env, cpuinfo=AVX2_CPU)["mode"] == "gpu"
    assert "ATEN_CPU_CAPABILITY" not in env
    # `pinned` pins even where a GPU is visible (a CPU-only job on a GPU node)
    assert numerics.decide({numerics.SWITCH: "pinned"}, cpuinfo=AVX2_CPU)[0] == "avx2"


def test_the_pin_overrides_a_dispatch_level_set_by_hand(no_gpu):
    env = {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO"}
    decided = numerics.pin_cpu_numerics(env, cpuinfo=AVX2_CPU)
    assert decided["mode"] == "avx2" and env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_CBWR"] == "AVX2,STRICT"
    assert env[numerics.MODE_VAR] == "avx2"


def test_a_bad_switch_value_is_refused_with_its_name():
    with pytest.raises(numerics.NumericsError, match="CLO_FAST_CPU_NUMERICS='fast'.*auto, pinned, native"):
        numerics.decide({numerics.SWITCH: "fast"})


def test_gpu_visible_respects_an_empty_cuda_visible_devices():
    assert numerics.gpu_visible({"CUDA_VISIBLE_DEVICES": ""}) is False
    assert numerics.gpu_visible({"CUDA_VISIBLE_DEVICES": "-1"}) is False


@pytest.mark.parametrize(
    ("argv", "ours"),
    [
        (["py", "-m", "clo_fast.compare", "--config", "x.yaml"], True),
        (["py", "-u", "-m", "clo_fast.evaluate"], True),
        (["py", "-X", "importtime", "-m", "clo_fast.data"], True),
        (["py", "-u", str(ROOT / "clo_fast" / "train.py"), "--local_rank=0"], True),
        (["py", "/usr/local/bin/clo-fast-eval", "--config", "x.yaml"], True),
        (["py", "/usr/local/bin/clo-fast", "train", "--config", "demo"], True),
        (["py", "-m", "pytest", "tests"], False),
        (["py", "-c", "import clo_fast"], False),
        (["py", "my_script.py"], False),
        (["py"], False),
    ],
)
def test_only_clo_fast_commands_count_as_entry_points(argv, ours):
    assert numerics.started_as_entry_point(argv) is ours


PROBE = (
    "import sys; sys.orig_argv[1:] = {argv!r}; import clo_fast, torch, json, os; "
    "print(json.dumps([torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR')]))"
)


def _capability(argv: list[str], **env: str) -> list:
    """(torch's CPU capability, MKL_CBWR) inside a fresh process that imports clo_fast as if started by `argv`."""
    e = {**os.environ, **env}
    e.pop(numerics.MODE_VAR, None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], env=e, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # starts processes for several seconds
def test_a_clo_fast_command_runs_on_the_pinned_kernels_whatever_the_environment_asked():
    mode, pinned = numerics.decide({k: v for k, v in os.environ.items() if k != numerics.SWITCH})
    if mode == "gpu":
        pytest.skip("a GPU is visible: nothing is pinned on GPU machines (tested above with a mocked GPU)")
    want = [pinned["ATEN_CPU_CAPABILITY"].upper(), pinned["MKL_CBWR"]]
    for level in ("default", "avx2", "avx512"):  # what a user's environment may ask for
        got = _capability(["-m", "clo_fast.compare"], ATEN_CPU_CAPABILITY=level, MKL_CBWR="AUTO")
        assert got == want, f"ATEN_CPU_CAPABILITY={level}: the command ran on {got}, not the pinned {want}"
    # a library import into someone else's program keeps what that program asked for
    assert _capability(["my_script.py"], ATEN_CPU_CAPABILITY="default", MKL_CBWR="AUTO") == ["DEFAULT", "AUTO"]
    # and the switch gives the machine's own kernels back
    native = _capability(["-m", "clo_fast.compare"], CLO_FAST_CPU_NUMERICS="native", ATEN_CPU_CAPABILITY="default")
    assert native[0] == "DEFAULT"


def test_the_demo_model_is_cached_per_numerics_mode(tmp_path, monkeypatch, no_gpu):
    from clo_fast.demo_model import demo_model_path

    monkeypatch.setattr(numerics, "cpu_has_avx2_fma", lambda cpuinfo=None: True)
    monkeypatch.delenv(numerics.SWITCH, raising=False)
    pinned = demo_model_path(tmp_path)
    monkeypatch.setenv(numerics.SWITCH, "native")
    native = demo_model_path(tmp_path)
    assert pinned.name.endswith("-avx2") and native.name.endswith("-native") and pinned.parent == native.parent
