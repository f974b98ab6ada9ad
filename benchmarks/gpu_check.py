"""The one prepared GPU check, step by step, most valuable first, within a total time budget.

Run by `benchmarks/gpu_check.sh` (which installs the carried wheels and sets PYTHONPATH); the steps:
  imports     every carried package imports (deepspeed with pydantic, datasets, peft, liger, cce, ...):
              the check stops at once if one does not, before any GPU second is spent on the rest
  bench_head  the head benchmark on its default paths (ours, ours with cuBLAS logits, Liger, CCE), the
              Llama-3-8B shape first, then Qwen-2.5-3B and Mistral-7B
  tma_ab      TMA tile shapes on (CLO_TMA=1 for this step's processes only; every other step runs without):
              the probe, then the Llama shape's fused path, against bench_head's Llama rows
  bench_step  the CLO step on the OpenAssistant profile: prefix_shared, padding_free, none and TRL+Liger,
              with a profiler split of each step by category and MFU
  gpu_tests   the GPU-marked tests and the CUDA runs of the cuBLAS / TMA / packing tests
  gpu_smoke   the trainer end to end (DeepSpeed ZeRO-3, bf16, 20 steps, resume, export): last
Each step has a time cap and gets at most what is left of the total (GPU_CHECK_BUDGET_S, 420 s by default,
counted from GPU_CHECK_T0, the shell script's start); a step that would start with under 10 s left is
skipped. Each step writes its JSON into OUT_DIR as soon as it ends (names carry the device: h200, cpu ...),
and `gpu_check_<device>.json` (machine, imports, every step's status, seconds and CLO_TMA) is rewritten
after every step; the whole output goes to `gpu_check_<device>.log`. At most 8 files, as the device tool
brings back.

GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU with tiny shapes (tests/test_gpu_check.py does, so a
script bug costs no GPU minute); GPU_CHECK_ONLY="bench_step gpu_smoke" runs only those after the imports.

    python3 benchmarks/gpu_check.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("imports", "bench_head", "tma_ab", "bench_step", "gpu_tests", "gpu_smoke")
# seconds per step at most (the total budget caps them further; the smoke takes what is left)
STEP_CAPS = {"imports": 30, "bench_head": 110, "tma_ab": 60, "bench_step": 100, "gpu_tests": 60, "gpu_smoke": 180}
TOTAL_BUDGET_S = 420
MIN_STEP_S = 10
DRY_RUN_SLACK = 3
# import names of the packages the GPU machine gets from the carried wheels (../shared/tools/gpu_wheels.sh), the
# image's own ones this project needs, and ours
CARRIED_MODULES = (
    "deepspeed",
    "pydantic",
    "datasets",
    "dill",
    "multiprocess",
    "xxhash",
    "accelerate",
    "peft",
    "hjson",
    "cpuinfo",
    "msgpack",
    "ninja",
    "einops",
    "liger_kernel",
    "cut_cross_entropy",
)
IMAGE_MODULES = ("torch", "triton", "transformers", "numpy", "clo_fast", "clo_kernels")
GPU_ONLY_MODULES = ("liger_kernel", "cut_cross_entropy")  # the GPU peers: not installed on CPU machines
BENCH_STEP_VARIANTS = "prefix_shared,padding_free,none,trl_liger"


def device_tag(dry: bool) -> str:
    """'h200', 'h100', 'a100' ... from the GPU's name; 'cpu' for a dry run."""
    if dry:
        return "cpu"
    import torch

    return device_tag_of(torch.cuda.get_device_name())


def device_tag_of(gpu_name: str) -> str:
    """'NVIDIA H200' → 'h200', 'NVIDIA A100-SXM4-80GB' → 'a100'; else the name in safe characters."""
    name = gpu_name.lower().replace("nvidia", "")
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


class Check:
    def __init__(self, out_dir: Path, dry: bool):
        self.out, self.dry = out_dir, dry
        self.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
        # a dry run on a small, shared CPU is slower than the GPU: three times the caps and the budget
        self.scale = DRY_RUN_SLACK if dry else 1
        self.budget = float(os.environ.get("GPU_CHECK_BUDGET_S") or TOTAL_BUDGET_S * self.scale)
        self.dev = device_tag(dry)
        self.log = open(out_dir / f"gpu_check_{self.dev}.log", "a")  # noqa: SIM115 - open for the whole run
        self.summary = {
            "device": self.dev,
            "dry_run": dry,
            "budget_s": self.budget,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
            "steps": [],
        }
        # every step runs without TMA tiles unless it asks for them (tma_ab): nothing leaks from the caller
        self.env = {k: v for k, v in os.environ.items() if k != "CLO_TMA"}
        self.env["PYTHONUNBUFFERED"] = "1"
        if dry:
            self.env.pop("TRITON_INTERPRET", None)  # the CPU runs use the torch head, as the trainer does

    def path(self, name: str) -> Path:
        return self.out / f"{name}_{self.dev}.json"

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, cmd: list[str], timeout: float, env: dict | None = None) -> int:
        """A command with its output into the log (and stdout); its return code, 124 if it ran out of time."""
        self.say("$ " + " ".join(cmd))
        try:
            r = subprocess.run(
                cmd,
                cwd=ROOT,
                env=env or self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=max(1.0, timeout),
            )
            out, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as e:
            raw = e.stdout or b""
            out, rc = raw.decode(errors="replace") if isinstance(raw, bytes) else raw, 124
        self.say(out.rstrip()[-20000:])
        return rc

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.path("gpu_check").with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary, indent=1))
        tmp.replace(self.path("gpu_check"))

    def step(self, name: str, fn) -> bool:
        cap = min(STEP_CAPS[name] * self.scale, self.left())
        # CLO_TMA as the step's processes see it: unset everywhere but tma_ab
        rec = {"step": name, "cap_s": round(cap, 1), "clo_tma": "1" if name == "tma_ab" else None}
        if cap < MIN_STEP_S:
            rec.update(status="skipped", reason=f"{self.left():.0f} s of the {self.budget:.0f} s budget left")
            self.summary["steps"].append(rec)
            self.save()
            self.say(f"=== {name}: skipped ({rec['reason']})")
            return False
        self.say(f"=== {name} (cap {cap:.0f} s, {self.left():.0f} s left, {time.strftime('%H:%M:%S')})")
        start = time.time()
        try:
            status, extra = fn(cap)
        except Exception as e:  # noqa: BLE001 - a broken step is a result; the next one still runs
            status, extra = "failed", {"error": f"{type(e).__name__}: {e}"}
        rec.update(status=status, seconds=round(time.time() - start, 1), **extra)
        self.summary["steps"].append(rec)
        self.save()
        self.say(f"=== {name}: {status} in {rec['seconds']} s")
        return status == "ok"

    # ----------------------------------------------------------------------------------------- steps
    def imports(self, cap):
        mods = [m for m in IMAGE_MODULES + CARRIED_MODULES if not (self.dry and m in GPU_ONLY_MODULES)]
        code = (
            "import importlib, importlib.metadata as md, json, sys\n"
            "out = {}\n"
            f"for m in {mods!r}:\n"
            "    try:\n"
            "        mod = importlib.import_module(m)\n"
            "        out[m] = getattr(mod, '__version__', 'imported')\n"
            "    except Exception as e:\n"
            "        out[m] = 'FAILED: ' + type(e).__name__ + ': ' + str(e)[:300]\n"
            "import torch\n"
            "out['_cuda'] = torch.cuda.get_device_name() if torch.cuda.is_available() else None\n"
            "print('IMPORTS ' + json.dumps(out))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=cap
        )
        self.say(proc.stdout.rstrip() + proc.stderr.rstrip()[-3000:])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTS ")]
        found = json.loads(lines[-1][len("IMPORTS ") :]) if lines else {"_error": proc.stderr[-1000:]}
        self.summary["imports"] = found
        if self.dry:
            self.summary["imports_not_checked"] = dict.fromkeys(GPU_ONLY_MODULES, "GPU peer, not on CPU")
        failed = [m for m, v in found.items() if str(v).startswith("FAILED") or m == "_error"]
        if not self.dry and not found.get("_cuda"):
            failed.append("_cuda (no GPU visible to torch)")
        return ("ok" if not failed and proc.returncode == 0 else "failed"), {"failed": failed}

    def _bench_head_args(self):
        if self.dry:
            return ["--device", "cpu", "--shapes", "tiny", "--examples", "1", "--reps", "1"]
        return []

    def bench_head(self, cap):
        out = self.path("bench_head")
        rc = self.run([sys.executable, "benchmarks/bench_head.py", *self._bench_head_args(), "--out", str(out)], cap)
        return ("ok" if rc == 0 and out.is_file() else f"failed (rc {rc})"), {"json": out.name}

    def tma_ab(self, cap):
        """CLO_TMA=1 for these processes only: the probe, then the Llama shape's fused path; the JSON gets the
        A/B against bench_head's rows (TMA off) of the same shape."""
        env = dict(self.env, CLO_TMA="1")
        out = self.path("bench_head_tma")
        deadline = time.time() + cap
        result = {}
        if self.dry:
            probe_rc = None
            result["probe"] = "not run: needs CUDA (dry run)"
        else:
            probe_rc = self.run([sys.executable, "benchmarks/tma_probe.py"], min(45, cap / 2), env)
            result["probe"] = "ok" if probe_rc == 0 else f"failed (rc {probe_rc})"
        report = {"probe": result["probe"]}
        if probe_rc not in (None, 0):
            out.write_text(json.dumps(report, indent=1))
            return "failed (TMA probe)", {**result, "json": out.name}
        args = self._bench_head_args() if self.dry else ["--shapes", "llama3-8b"]  # the dry run's one shape
        cmd = [sys.executable, "benchmarks/bench_head.py", *args, "--paths", "fused", "--out", str(out)]
        rc = self.run(cmd, deadline - time.time(), env)
        if out.is_file():
            on = json.loads(out.read_text())
            base = self.path("bench_head")
            off = json.loads(base.read_text()) if base.is_file() else {"rows": []}
            ab = {}
            for row in on.get("rows", []):
                ms_on = row["ms"].get("fused", {}).get("median")
                ms_off = next(
                    (
                        r["ms"].get("fused", {}).get("median")
                        for r in off["rows"]
                        if r["shape"] == row["shape"] and r["head"] == row["head"]
                    ),
                    None,
                )
                ab[f"{row['shape']}/{row['head']}"] = {
                    "fused_ms_tma_off": ms_off,
                    "fused_ms_tma_on": ms_on,
                    "off_over_on": round(ms_off / ms_on, 3) if ms_off and ms_on else None,
                    "tma_in_tile_space": row.get("tma_in_tile_space"),
                    "autotuned": row.get("autotuned"),
                }
            on["probe"] = report["probe"]
            on["tma_ab"] = ab
            on["tma_ab_note"] = "TMA off: bench_head's row of the same shape, minutes earlier in the same check"
            out.write_text(json.dumps(on, indent=1))
        return ("ok" if rc == 0 and out.is_file() else f"failed (rc {rc})"), {**result, "json": out.name}

    def bench_step(self, cap):
        """The oasst profile's step, twice if time allows: as the body comes (the comparison measured before), then
        with Liger's body kernels on every variant (the peer as TRL's use_liger_kernel runs it; ours alike)."""
        deadline = time.time() + cap
        base = ["--device", "cpu", "--shape", "tiny", "--examples", "2", "--steps", "1", "--warmup", "0"]
        base = base if self.dry else ["--gpu"]
        base += ["--profiles", "oasst", "--variants", BENCH_STEP_VARIANTS, "--profile-split"]
        runs = {"bench_step": [], "bench_step_liger_body": [] if self.dry else ["--liger-body"]}  # no Liger on CPU
        status, files = "ok", []
        for name, extra in runs.items():
            left = deadline - time.time()
            if left < MIN_STEP_S:
                status = f"ok, {name} not run ({left:.0f} s left)" if files else "failed (no time)"
                break
            out = self.path(name)
            cmd = [sys.executable, "benchmarks/bench_step.py", *base, *extra, "--timeout", str(int(left))]
            rc = self.run(cmd + ["--out", str(out)], left + 5)
            files.append(out.name)
            if rc != 0 or not out.is_file():
                status = f"failed (rc {rc} in {name})"
        return status, {"json": files[0] if files else None, "jsons": files}

    def gpu_tests(self, cap):
        """Three pytest runs, most valuable first (each reports even if a later one runs out of time): the cuBLAS
        logits path compiled (the G-buffer race is a GPU-only bug), the GPU-marked kernel tests, the packing ones."""
        out = self.path("gpu_tests")
        deadline = time.time() + cap
        if self.dry:  # the interpreter runs of the selected tests take minutes on CPU: the GPU-marked ones (skipped)
            groups = {"ops": ["-m", "gpu", "tests/test_ops.py"], "packing": ["-m", "gpu", "tests/test_packing.py"]}
        else:
            groups = {
                "cublas_logits": ["tests/test_ops.py", "-k", "cublas or logit_gemm"],
                "ops": ["tests/test_ops.py", "-m", "gpu"],
                "packing": ["tests/test_packing.py", "-k", "gpu"],
            }
        report, rc_all = {}, 0
        for name, select in groups.items():
            xml = self.out / f".junit_{name}.xml.tmp"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={xml}", *select]
            rc = self.run(cmd, deadline - time.time())
            rc_all = rc_all or rc
            report[name] = {"command": " ".join(cmd[1:]), "returncode": rc, **_junit_summary(xml)}
            json_tmp = out.with_suffix(".tmp")
            json_tmp.write_text(json.dumps(report, indent=1))
            json_tmp.replace(out)
            if time.time() > deadline - 1:
                break
        return ("ok" if rc_all == 0 and len(report) == len(groups) else f"failed (rc {rc_all})"), {"json": out.name}

    def gpu_smoke(self, cap):
        out = self.path("gpu_smoke")
        deadline = time.time() + cap
        base = (self.out / ".smoke") if self.dry else ROOT / "outputs" / "gpu_smoke"
        where = [
            "--set",
            f"model.name_or_path={base / 'model'}",
            "--set",
            f"data.cache_dir={base / 'cache'}",
            "--set",
            f"data.output_dir={base / 'data'}",
            "--set",
            f"train.output_dir={base / 'run'}",
        ]
        if self.dry:  # the tiny model in fp32 with the torch head on a CPU rank (bf16 and Triton are the GPU's)
            where += ["--set", "model.dtype=float32", "--set", "optim.lr=1e-2", "--set", "train.head_impl=auto"]
        build = [sys.executable, "benchmarks/gpu_smoke.py", "build", str(base / "model")]
        build += ["--tiny"] if self.dry else []
        launcher = ["deepspeed", "--num_gpus", "1", "--master_port", str(_free_port())]
        train = [*launcher, "clo_fast/train.py", "--config", "configs/gpu_smoke.yaml", *where]
        check = [sys.executable, "benchmarks/gpu_smoke.py", "check", str(base / "run"), "--first-steps", "20"]
        check += ["--out", str(out)]
        shutil.rmtree(base / "run", ignore_errors=True)  # the check's own run folder, made again each time
        for cmd in (build, train, train + ["--resume", "--set", "optim.max_steps=24"], check):
            rc = self.run(cmd, deadline - time.time())
            if rc != 0:
                if not out.is_file():
                    out.write_text(json.dumps({"ok": False, "failed_command": " ".join(cmd), "returncode": rc}))
                return f"failed (rc {rc})", {"json": out.name}
        return "ok", {"json": out.name}


def _junit_summary(xml: Path) -> dict:
    """Counts and failures from a pytest JUnit file (removed after reading); empty if pytest wrote none."""
    if not xml.is_file():
        return {}
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["seconds"] = float(suite.get("time", 0))
    out["failed"] = {
        f"{case.get('classname')}::{case.get('name')}": (bad.get("message") or "")[:500]
        for case in suite.iter("testcase")
        for bad in list(case.findall("failure")) + list(case.findall("error"))
    }
    xml.unlink()
    return out


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 for the launcher (another job on the machine may hold the default 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0] if argv else os.environ.get("OUT") or ROOT / "gpu_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    dry = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
    check = Check(out_dir, dry)
    check.say(f"gpu_check: device {check.dev}, dry run {dry}, budget {check.budget:.0f} s, out {out_dir}")
    if not dry:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw", "--format=csv"],
            capture_output=True,
            text=True,
        )
        check.summary["nvidia_smi"] = smi.stdout.strip()
    ok = check.step("imports", check.imports)
    if not ok:
        check.say("=== imports failed: stopping here (every later step needs them)")
    else:
        only = os.environ.get("GPU_CHECK_ONLY", "").split()  # developers: just these steps (after imports)
        for name in STEPS[1:]:
            if not only or name in only:
                check.step(name, getattr(check, name))
    total = time.time() - check.t0
    check.summary["total_s"] = round(total, 1)
    check.save()
    check.say("=== summary")
    for rec in check.summary["steps"]:
        check.say(f"{rec['step']:12} {rec['status']:24} {rec.get('seconds', '-')} s (cap {rec['cap_s']} s)")
    check.say(f"total {total:.0f} s of the {check.budget:.0f} s budget")
    return 0 if ok and all(r["status"] == "ok" for r in check.summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
