"""Pinned CPU numerics: the same bits from torch on every x86 CPU, set where a process starts.

torch picks its CPU kernels by the CPU's vector ISA (ATen's dispatch: default / AVX2 / AVX-512) and MKL picks
its GEMM code path the same way. Each path sums in another order, so before this module the demo's and the
comparison's numbers moved with the machine: on an AVX-512 CPU the demo base scored a reference NLL of
6.461 / 6.074 where an AVX2 CPU gave 6.446 / 6.112, and fidelities moved by several prompts. Pinned, every
x86-64 CPU with AVX2 and FMA (Intel since Haswell, AMD since Zen) runs the same kernels in the same order.

What is pinned, in the environment, before torch is imported (child processes inherit it):

    ATEN_CPU_CAPABILITY=avx2   ATen's vectorised kernels: reductions, softmax, exp/log, sdpa's CPU path
    MKL_CBWR=AVX2,STRICT       MKL's GEMM code path (conditional numerical reproducibility); STRICT keeps
                               the bits when the thread count changes

Where a GPU is visible nothing is pinned (the work runs on the GPU; a capped ISA would only slow host code).
`CLO_FAST_CPU_NUMERICS=native` turns the pinning off (the CPU's own fastest kernels, machine-dependent bits);
`=pinned` forces it on. A CPU without AVX2+FMA gets torch's portable kernels (`default`, MKL `COMPATIBLE`):
reproducible among such CPUs, but not equal to the figures measured on AVX2 machines.

Only the standard library is imported here: this module must run before torch is.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import MutableMapping

SWITCH = "CLO_FAST_CPU_NUMERICS"  # auto (unset) | pinned | native
SWITCH_VALUES = ("auto", "pinned", "native")
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}  # CPUs without AVX2+FMA
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MODE_VAR = "CLO_FAST_CPU_NUMERICS_APPLIED"  # what the process that started the job chose, for its children's logs


class NumericsError(ValueError):
    """A bad value of CLO_FAST_CPU_NUMERICS."""


def gpu_visible(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether this process may see a GPU, decided without importing torch (device nodes, CUDA_VISIBLE_DEVICES)."""
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def cpu_has_avx2_fma(cpuinfo: str | None = None) -> bool:
    """AVX2 and FMA in the CPU's flags (/proc/cpuinfo); True off Linux, where torch's own check decides."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx2" in flags and "fma" in flags


def decide(environ: MutableMapping[str, str] = os.environ, *, cpuinfo: str | None = None) -> tuple[str, dict]:
    """(mode, variables to set) for this environment: `avx2` (pinned), `portable` (pinned, a CPU without
    AVX2+FMA), `native` (switched off) or `gpu` (a GPU is visible: nothing pinned). Changes nothing."""
    switch = environ.get(SWITCH, "auto").strip().lower() or "auto"
    if switch not in SWITCH_VALUES:
        raise NumericsError(f"{SWITCH}={environ[SWITCH]!r}: expected one of {', '.join(SWITCH_VALUES)}")
    if switch == "native":
        return "native", {}
    if switch == "auto" and gpu_visible(environ):
        return "gpu", {}
    if cpu_has_avx2_fma(cpuinfo):
        return "avx2", dict(PINNED_ENV)
    return "portable", dict(PORTABLE_ENV)


def pin_cpu_numerics(environ: MutableMapping[str, str] = os.environ, *, cpuinfo: str | None = None) -> dict:
    """Pin the CPU numerics in `environ` (see the module docstring); returns what was decided.

    Call it first thing in an entry point, before torch is imported. Called after torch was imported it
    still pins the environment that child processes inherit, and says the calling process itself is not
    pinned (`this_process: False`)."""
    mode, env = decide(environ, cpuinfo=cpuinfo)
    environ.update(env)
    environ[MODE_VAR] = mode
    return {"mode": mode, "env": dict(env), "this_process": "torch" not in sys.modules}


def started_as_entry_point(argv: list[str] | None = None) -> bool:
    """Whether this process was started as one of clo-fast's commands: `python -m clo_fast[.x]`, the
    `clo_fast/train.py` script (under any launcher) or the `clo-fast` / `clo-fast-*` console scripts. A library
    import into someone else's program is not: their process keeps its own numerics."""
    args = list(sys.orig_argv if argv is None else argv)[1:]  # after the interpreter
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
        args = args[2:] if args[0] in ("-X", "-W") else args[1:]  # interpreter options (-u, -X importtime, ...)
    if len(args) >= 2 and args[0] == "-m":
        return args[1].split(".")[0] == "clo_fast"
    if not args or args[0] == "-c":
        return False
    script = args[0]
    if os.path.basename(script) == "clo-fast" or os.path.basename(script).startswith("clo-fast-"):
        return True
    return os.path.realpath(script) == os.path.realpath(os.path.join(PACKAGE_DIR, "train.py"))


def pin_if_entry_point() -> dict | None:
    """`pin_cpu_numerics()` when this process is one of clo-fast's commands (see `started_as_entry_point`)."""
    return pin_cpu_numerics() if started_as_entry_point() else None


def describe() -> dict:
    """The numerics this process runs with, for run summaries and reports (imports torch)."""
    import torch

    return {
        "mode": os.environ.get(MODE_VAR, "unpinned"),
        **{k: os.environ.get(k) for k in PINNED_ENV},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def summary_line() -> str:
    """One log line: what the CPU numerics are and how to change them."""
    d = describe()
    if d["mode"] in ("avx2", "portable"):
        pins = f"torch {d['torch_cpu_capability']}, MKL_CBWR={d['MKL_CBWR']}"
        return f"CPU numerics pinned ({d['mode']}: {pins}; {SWITCH}=native turns it off)"
    return f"CPU numerics {d['mode']} (torch {d['torch_cpu_capability']})"
