"""Shared benchmark utilities: machine and version facts, interleaved timing, peak memory, the harness a
benchmark script runs on (command line, JSON results, child processes), realistic inputs (length profiles,
CLO examples, random Llama models, LM-like head inputs), and a step's profile split and model FLOPs / MFU
(`profile_split`, `model_flops`, `peak_flops`).

Realistic inputs, because the head's cost depends on them:
- Lengths (`LENGTH_PROFILES`): per example an English prompt and response drawn from log-normal
  distributions, the target-language texts longer in tokens (an English-centric tokenizer splits them
  finer), the four CLO sequences [x_en|y_en], [x_en|y_tgt], [x_tgt|y_tgt], [x_tgt|y_en] padded to the
  batch's longest. Only response tokens carry labels; prompts and padding are ignored rows.
- Logits (`lm_like_head_inputs`): hidden states x = u + β·w_t + g with a unigram direction u (the head's
  rows carry a Zipf log-prior along u), an intended token t drawn from that prior and boosted by β, and
  N(0, 1) noise g; labels are drawn from the resulting softmax itself. This gives peaked rows with an
  entropy of a few nats and a label NLL close to it (both measured and reported), where `randn` inputs
  give p ≈ 1/V everywhere (entropy ≈ ln V), which no trained LM produces.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # where results/ lives; the project itself is imported installed

import torch

from clo_fast.demo_model import MODEL_SHAPE as DEMO_MODEL_SHAPE
from clo_fast.demo_model import VOCAB_SIZE as DEMO_VOCAB_SIZE

# Llama-3.2-1B's shape (LlamaConfig fields): the step benchmark's and the GPU smoke run's model, random weights
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
}

# The Llama shapes a step benchmark builds by name (LlamaConfig fields; bench_step.py --shape)
LLAMA_SHAPES = {
    # "demo": the demo model's shape (clo_fast/demo_model.py MODEL_SHAPE, its 2048-token vocabulary), i.e. the
    # demo config's step; "cpu-small": a head-heavier small shape (V = 32000)
    "demo": {**DEMO_MODEL_SHAPE, "vocab_size": DEMO_VOCAB_SIZE},
    "cpu-small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": LLAMA_3_2_1B,
    # SmolLM2-135M-Instruct (configs/smollm2_sw.yaml's real model): small body, a 49152-token tied head
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
    },
    # gpu_check's CPU dry run: the smallest Llama that runs every code path
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "tie_word_embeddings": True,
    },
}
PAD_ID, EOS_ID = 0, 2  # the synthetic examples' special tokens (make_examples, make_model)

# Token-length profiles. "oasst": OpenAssistant-like single-turn instruction data — median English
# prompt ≈ 60 tokens and response ≈ 220 tokens with long tails (log-normal σ ≈ 0.8), and target-language
# text ≈ 1.4× the English token count under a Llama-3-style English-centric tokenizer. These are the
# assumed shape of such data, not a measurement of a downloaded corpus (none is reachable here); the
# result they give — 55–65% of padded rows unlabelled — matches what issue #10 measured on the real
# configs' padding (60–64%). "demo": the bundled demo data's profile (short pairs, 128-token cap).
LENGTH_PROFILES = {
    "oasst": {
        "prompt_median": 60,
        "response_median": 220,
        "sigma": 0.8,
        "tgt_ratio": 1.4,
        "max_len": 1024,
        "pad_to": 64,
    },
    "demo": {"prompt_median": 14, "response_median": 30, "sigma": 0.4, "tgt_ratio": 1.5, "max_len": 128, "pad_to": 16},
}


def machine_info(device: str) -> str:
    """The device as a report names it: the GPU's name, or the CPU model and core count; with torch's version."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (torch {torch.__version__})"


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "deepspeed", "liger_kernel", "cut_cross_entropy"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "installed")
        except Exception:  # not installed: recorded as such
            v[mod] = None
    if v.get("liger_kernel") == "installed":
        try:
            from importlib.metadata import version

            v["liger_kernel"] = version("liger-kernel")
        except Exception:
            pass
    return v


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_timings(fns: dict, device: str, warmup: int, reps: int, on_error=None) -> dict:
    """Time each callable `reps` times, round-robin (path A, B, C, A, B, C, ...), so clock and thermal
    drift hit every path alike. Returns {name: {median, p10, p90, reps}} in ms; a path that raises is
    dropped and reported through on_error(name, exc)."""
    live = dict(fns)
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
            sync(device)
        except Exception as e:  # a peer failing on a shape is a result, not a crash
            live.pop(name)
            if on_error:
                on_error(name, e)
    times = {name: [] for name in live}
    for _ in range(reps):
        for name, fn in live.items():
            sync(device)
            times[name].append(time_once_ms(fn, device))
    return {name: summarize(ts) for name, ts in times.items()}


def summarize(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return {"median": round(statistics.median(ts), 3), "p10": round(q[0], 3), "p90": round(q[-1], 3), "reps": len(ts)}


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile of xs (linear interpolation between order statistics)."""
    ys = sorted(xs)
    k = (len(ys) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (k - lo)


def cuda_peak_mb(fn) -> float:
    """Peak CUDA memory above what is allocated before the call (MB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def spread(prefix: str, xs: list[float]) -> dict:
    """{prefix: median, prefix_p10, prefix_p90, prefix_min} of times in ms, rounded to 0.01."""
    return {
        prefix: round(statistics.median(xs), 2),
        f"{prefix}_p10": round(quantile(xs, 0.1), 2),
        f"{prefix}_p90": round(quantile(xs, 0.9), 2),
        f"{prefix}_min": round(min(xs), 2),
    }


def ratio_spread(kind: str, base: list[float], other: list[float]) -> dict:
    """Per round base / other (both timed in the same round, so under the same load), then the median and
    p10/p90 of those ratios: {kind_ratio_median, kind_ratio_p10, kind_ratio_p90}."""
    r = [tb / to for tb, to in zip(base, other, strict=True)]
    return {
        f"{kind}_ratio_median": round(statistics.median(r), 3),
        f"{kind}_ratio_p10": round(quantile(r, 0.1), 3),
        f"{kind}_ratio_p90": round(quantile(r, 0.9), 3),
    }


def rotating_rounds(fns: dict, warmup: int, rounds: int) -> tuple[dict, dict, dict]:
    """CPU timing on a shared machine: every callable once per round, warmup + rounds rounds, in one process, so
    load from other processes hits all of them alike; the order rotates every round (round i starts at callable
    i mod n), so none always runs right after the same one. Returns ({name: wall ms per timed round},
    {name: this process's CPU ms per timed round}, {name: exception}); a callable that raises is dropped."""
    live = dict(fns)
    wall = {name: [None] * rounds for name in live}
    cpu = {name: [None] * rounds for name in live}
    failed = {}
    for i in range(warmup + rounds):
        order = list(live)
        order = order[i % len(order) :] + order[: i % len(order)] if order else order
        for name in order:
            c0 = time.process_time()
            t0 = time.perf_counter()
            try:
                live[name]()
            except Exception as e:  # a path failing is a result, not a crash
                failed[name] = e
                live.pop(name)
                continue
            if i >= warmup:
                wall[name][i - warmup] = (time.perf_counter() - t0) * 1e3
                cpu[name][i - warmup] = (time.process_time() - c0) * 1e3
    return {n: wall[n] for n in live}, {n: cpu[n] for n in live}, failed


def timed_calls(fn, warmup: int, reps: int, device: str) -> tuple[list[float], list]:
    """fn() warmup + reps times, each synchronised on both ends; returns (ms of the last reps, every return value)."""
    times, outs = [], []
    for i in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        outs.append(fn())
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times, outs


def rss_mib() -> float:
    """This process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def peak_mib(device: str):
    """Peak memory of the block in MiB, in the yielded dict's "mib" once it ends: CUDA, max allocated above what
    was allocated at its start (the peak reset there); CPU, the process's peak RSS above its peak at the start."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if cuda else 0
    rss0 = rss_mib()
    box = {}
    yield box
    box["mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if cuda else rss_mib() - rss0


def free_memory(device: str) -> None:
    """Give back what the last run held (garbage, and on CUDA the allocator's cache)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- harness
def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line, its module docstring as the --help text, line breaks kept."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def apply_tma_request() -> bool:
    """CLO_TMA=1 (gpu_check's tma_ab step sets it for its processes only) puts the TMA tile shapes into the
    kernels' autotune space (`launch.set_tma`); the library itself never reads the environment for it."""
    import clo_kernels.launch as launch

    wanted = os.environ.get("CLO_TMA") == "1"
    launch.set_tma(wanted)
    return wanted


def fill_defaults(args, defaults: dict, keep_zero: tuple = ()) -> None:
    """Each flag of `defaults` left unset takes its default: unset is None, or any falsy value except for the
    flags in keep_zero (where 0 is a choice, e.g. no warmup)."""
    for k, default in defaults.items():
        v = getattr(args, k)
        if (v is None) if k in keep_zero else not v:
            setattr(args, k, default)


def flags_of(args, names: tuple, switches: tuple = ()) -> list[str]:
    """The command-line flags that hand `args`' values of `names` (and the store_true `switches` that are on)
    to a child process: --name-with-dashes value."""
    out = [
        x for k in names if getattr(args, k) is not None for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))
    ]
    return out + [f"--{k.replace('_', '-')}" for k in switches if getattr(args, k)]


def results_path(name: str) -> Path:
    """Where a benchmark writes its JSON unless told otherwise: benchmarks/results/<name>."""
    return ROOT / "benchmarks" / "results" / name


def write_json(path, doc: dict) -> None:
    """The JSON written whole or not at all (a temporary file renamed): a run cut short by a time limit leaves
    its last complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def append_json_line(path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_child(cmd: list[str], timeout: float, tail: int) -> tuple[int, str]:
    """A child process to its end or the timeout: (return code, -1 on timeout; the last `tail` characters of
    its stderr, else stdout)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stderr or r.stdout)[-tail:]
    except subprocess.TimeoutExpired as e:
        return -1, f"timed out after {e.timeout} s"


def child_launcher(script: str, flags: list[str]):
    """launch(variants, lines, extra, timeout, tail) → (rc, tail): `script` as a child (--child) over the
    variants, writing its records to `lines`, with the parent's resolved `flags` and then `extra`."""

    def launch(variants, lines, extra, timeout, tail):
        cmd = [sys.executable, script, "--child", "--lines-out", str(lines), "--variants", ",".join(variants)]
        return run_child(cmd + flags + extra, timeout, tail)

    return launch


def run_in_children(names: list[str], launch, one_per_process: bool, finished):
    """Runs named cases in child processes: launch(batch) runs one child over the batch and returns (rc, tail);
    finished(name) says whether a case left all its records. One case per child (one_per_process: e.g. its own
    peak RSS) or all that remain in one; a child that fails or finishes nothing died in its first unfinished
    case, which is dropped, and a fresh child goes on with the rest. Yields after every child: (the case it
    died in or None, why)."""
    remaining = list(names)
    while remaining:
        batch = remaining[:1] if one_per_process else list(remaining)
        rc, tail = launch(batch)
        done = [n for n in batch if finished(n)]
        for n in done:
            remaining.remove(n)
        stuck = next((n for n in batch if n not in done), None)
        if (rc != 0 or not done) and stuck is not None:
            remaining.remove(stuck)
            yield stuck, f"child process failed (rc {rc}): {tail}"
        else:
            yield None, ""


# ----------------------------------------------------------------- a step benchmark: variants × profiles in children
# The parent runs the variants in child processes of the same script (`--child`), which append one JSON line per
# (variant, profile) to --lines-out; on CPU one more child times them all interleaved (`--child --interleave`).
def add_child_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the child processes: threads, their time limit, and the parent's own hidden ones."""
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    p.add_argument("--timeout", type=float, default=None, help="seconds per child process (default 600)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interleave", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lines-out", help=argparse.SUPPRESS)


def child_main(a, run, interleaved, label: str) -> int:
    """A child: run(variant, profile) → result per variant × profile (an exception recorded as its error), or with
    --interleave interleaved(variants, profile) → {variant: timing} per profile; one JSON line each."""
    if a.device == "cpu":
        torch.set_num_threads(max(1, a.threads))
    variants, profiles = a.variants.split(","), a.profiles.split(",")
    if a.interleave:
        for profile in profiles:
            for v, r in interleaved(variants, profile).items():
                append_json_line(a.lines_out, {"variant": v, "profile": profile, "timing": r})
        return 0
    for v in variants:
        for profile in profiles:
            rec = {"variant": v, "profile": profile}
            print(f"[{label}] {v} / {profile} ...", file=sys.stderr, flush=True)
            try:
                rec["result"] = run(v, profile)
            except Exception as e:  # a failing variant is a result, not a crash
                rec["error"] = f"{type(e).__name__}: {str(e)[:500]}\n{traceback.format_exc()[-1500:]}"
                if a.device == "cuda":
                    free_memory(a.device)
            append_json_line(a.lines_out, rec)
    return 0


def run_variant_children(a, variants, launch, results: dict, errors: dict, save, label: str) -> None:
    """The variants in child processes (run_in_children), `save()` after each: on CPU one per variant (its peak
    RSS is its own), on CUDA one for all. launch(variants, lines, extra, timeout, tail) → (rc, tail) starts one;
    its records go into results[profile][variant] and errors["variant/profile"]."""
    gpu, profiles = a.device == "cuda", a.profiles.split(",")
    own_steps = [] if gpu else ["--steps", "1", "--warmup", "0"]  # CPU: times come from the interleaved run
    with tempfile.TemporaryDirectory() as td:

        def one_child(batch):
            lines = Path(td) / f"lines_{batch[0]}.jsonl"
            rc, tail = launch(batch, lines, own_steps, a.timeout or 600, 3000)
            for rec in read_json_lines(lines):
                if "result" in rec:
                    results.setdefault(rec["profile"], {})[rec["variant"]] = rec["result"]
                else:
                    errors[f"{rec['variant']}/{rec['profile']}"] = rec["error"]
            return rc, tail

        def finished(v):
            return all(v in results.get(pr, {}) or f"{v}/{pr}" in errors for pr in profiles)

        for stuck, why in run_in_children(variants, one_child, not gpu, finished):
            if stuck is not None:
                errors[stuck] = why
                print(f"[{label}] {stuck} failed:\n{why.split(': ', 1)[1]}", file=sys.stderr)
            save()


def run_interleaved_child(a, variants, launch, results: dict, errors: dict) -> dict:
    """CPU: the per-variant processes give the counts and each variant's own peak RSS; the step times come from
    one process that runs every variant's steps round-robin (fair under shared load). Merges them into results;
    returns the paired round ratios per profile."""
    paired = {}
    ran = [v for v in variants if any(v in results[pr] for pr in results)]
    with tempfile.TemporaryDirectory() as td:
        lines = Path(td) / "interleaved.jsonl"
        _, tail = launch(ran, lines, ["--interleave"], a.timeout or 1200, 2000)
        if not lines.is_file():
            errors["interleaved_timing"] = tail
        for rec in read_json_lines(lines):
            v, profile, timing = rec["variant"], rec["profile"], rec["timing"]
            res = results.get(profile, {}).get(v)
            if v == "_paired":
                paired[profile] = timing
            elif res is not None and "error" in timing:
                errors[f"{v}/{profile}/interleaved"] = timing["error"]
            elif res is not None:
                res["step_ms_own_process"] = res["step_ms"]
                res.update(timing)
                res["step_ms_kind"] = (
                    "median (p10, p90) of rounds interleaved with the other variants in one process, order "
                    "rotated every round (wall); step_cpu_ms: that process's CPU time per step"
                )
    return paired


def interleaved_cases(runs: dict, warmup: int, rounds: int, pairs, extra=None) -> dict:
    """rotating_rounds over the cases' callables → per case {"step_ms" (median wall), p10/p90/min, "step_cpu_ms"
    (median CPU time of this process) and its spread, the per-round lists, **extra(name)} or {"error"}; and under
    "_paired", per (case, base) of pairs that both ran: the per-round ratios base / case (ratio_spread)."""
    wall, cpu, failed = rotating_rounds(runs, warmup, rounds)
    out = {v: {"error": f"{type(e).__name__}: {str(e)[:300]}"} for v, e in failed.items()}
    for v in wall:
        # wall time: median of the interleaved rounds; CPU time of this process: the work itself, much less
        # disturbed by other processes' load on a shared machine (with 1 thread, no spin-waiting in it)
        out[v] = {
            **spread("step_ms", wall[v]),
            "step_ms_all": [round(t, 2) for t in wall[v]],
            **spread("step_cpu_ms", cpu[v]),
            "step_cpu_ms_all": [round(t, 2) for t in cpu[v]],
            **(extra(v) if extra else {}),
        }
    out["_paired"] = {
        f"{m}_vs_{b}": {**ratio_spread("wall", wall[b], wall[m]), **ratio_spread("cpu", cpu[b], cpu[m])}
        for m, b in pairs
        if m in wall and b in wall
    }
    return out


def reference_logps(model, examples: list[dict], head_impl: str, token_budget: int, device):
    """Precomputed reference log-probs [N,4] of CLO examples (the frozen model = the initial `model`: one no-grad
    packed pass through CLOPolicy), shifted by a little noise (seed 3) so the DPO margins are not all 0."""
    from clo_fast.model import build_policy
    from clo_fast.packing import build_packed_batch, plan_micro_batches

    policy = build_policy(model, head_impl=head_impl).eval()
    out = torch.zeros(len(examples), 4)
    with torch.no_grad():
        for g in plan_micro_batches(examples, "padding_free", token_budget):
            b = build_packed_batch([examples[i] for i in g], "padding_free", PAD_ID).to(device)
            out[g] = policy(b).view(-1, 4).float().cpu()
    del policy
    g = torch.Generator().manual_seed(3)
    return out + 0.05 * torch.randn(out.shape, generator=g)


def accumulating(groups, micro_loss):
    """A training step over micro-batches: each one's loss, micro_loss(i, group), backward as it comes (gradient
    accumulation); the step returns the summed loss."""

    def step():
        total = 0.0
        for i, g in enumerate(groups):
            loss = micro_loss(i, g)
            loss.backward()
            total += float(loss.detach())
        return total

    return step


def with_optimizer(step, opt):
    """One optimizer step: step() (the micro-batches), then the optimizer; returns step()'s loss."""

    def run():
        loss = step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return run


def mfu_fields(model, examples: list[dict], step_s: float, device, dtype) -> dict:
    """model_flops_per_step, model_tokens_per_s, mfu (over each peak_flops) and peak_flops of a step of step_s."""
    flops, peaks = model_flops(model, examples), peak_flops(device, dtype)
    return {
        "model_flops_per_step": flops,
        "model_tokens_per_s": round(flops["tokens"] / step_s, 1),
        "mfu": {k: (round(flops["total"] / step_s / v, 4) if v else None) for k, v in peaks["flops_per_s"].items()},
        "peak_flops": peaks,
    }


# ------------------------------------------------------------------------------------------ lengths
def sample_lengths(profile: str, examples: int, seed: int = 0) -> list[dict]:
    """Per example: prompt and response token counts in English and the target language."""
    p = LENGTH_PROFILES[profile]
    g = torch.Generator().manual_seed(seed)

    def draw(median):
        return max(2, int(math.exp(math.log(median) + p["sigma"] * torch.randn(1, generator=g).item())))

    out = []
    for _ in range(examples):
        x_en, y_en = draw(p["prompt_median"]), draw(p["response_median"])
        ex = {
            "x_en": x_en,
            "y_en": y_en,
            "x_tgt": max(2, round(x_en * p["tgt_ratio"])),
            "y_tgt": max(2, round(y_en * p["tgt_ratio"])),
        }
        # cut responses (as the data builder does) so that every sequence fits max_len
        for x, y in (("x_en", "y_en"), ("x_en", "y_tgt"), ("x_tgt", "y_tgt"), ("x_tgt", "y_en")):
            ex[x] = min(ex[x], p["max_len"] // 2)
            ex[y] = min(ex[y], p["max_len"] - ex[x])
        out.append(ex)
    return out


CLO_SEQUENCES = (("x_en", "y_en"), ("x_en", "y_tgt"), ("x_tgt", "y_tgt"), ("x_tgt", "y_en"))


def label_mask(profile: str, examples: int, seed: int = 0) -> torch.Tensor:
    """[4B, T] bool: True on response tokens (labelled rows) of the padded batch, T = longest rounded up."""
    p = LENGTH_PROFILES[profile]
    lens = sample_lengths(profile, examples, seed)
    seqs = [(ex[x], ex[y]) for ex in lens for x, y in CLO_SEQUENCES]
    T = max(a + b for a, b in seqs)
    T = min(p["max_len"], -(-T // p["pad_to"]) * p["pad_to"])
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for s, (a, b) in enumerate(seqs):
        mask[s, a : min(T, a + b)] = True
    return mask


def make_examples(profile: str, n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenized CLO examples with the profile's lengths (sample_lengths): random tokens, responses ending in
    EOS, labels -100 on the prompt, as clo_fast.data.tokenize_dataset lays them out."""
    g = torch.Generator().manual_seed(seed + 1)

    def tokens(k):
        return torch.randint(8, vocab, (k,), generator=g).tolist()

    out = []
    for ln in sample_lengths(profile, n, seed):
        parts = {
            "x_en": tokens(ln["x_en"]),
            "x_tgt": tokens(ln["x_tgt"]),
            "y_en": tokens(ln["y_en"] - 1) + [EOS_ID],
            "y_tgt": tokens(ln["y_tgt"] - 1) + [EOS_ID],
        }
        ids, labels = [], []
        for x, y in CLO_SEQUENCES:  # sample_lengths already cut the lengths so every sequence fits
            ids.append(parts[x] + parts[y])
            labels.append([-100] * len(parts[x]) + parts[y])
        out.append({"input_ids": ids, "labels": labels})
    return out


# ------------------------------------------------------------------------------------------ models
def apply_liger_body(model) -> None:
    """Liger's fused RMSNorm, RoPE and SwiGLU on the body, as TRL's `use_liger_kernel` applies them (its head
    kernels stay off: each variant brings its own head). The RoPE patch replaces transformers' Llama
    `apply_rotary_pos_emb` for the whole process, so it is applied to every variant alike."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
    )


def make_model(shape: str, dtype, device, attn: str, liger_body: bool = False):
    """A random LlamaForCausalLM of LLAMA_SHAPES[shape], the same weights on every call (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {"max_position_embeddings": 4096, **LLAMA_SHAPES[shape]}  # a shape may state its own (demo: 1024)
    cfg = LlamaConfig(**fields, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the run dtype (no fp32 copy of a 1B model)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    if liger_body:
        apply_liger_body(model)
    return model


# --------------------------------------------------------------------------------------- LM-like head
def lm_like_head_inputs(
    S: int, T: int, H: int, V: int, dtype, device, *, seed: int = 0, boost=(6.0, 14.0), zipf_s: float = 1.1
):
    """hidden [S,T,H], weight [V,H] and labels [S,T] (all positions labelled; mask them afterwards) with
    LM-like logits. Returns (hidden, weight, labels, stats) with the mean entropy and label NLL in nats."""
    g = torch.Generator(device=device).manual_seed(seed)  # built where it is used: GPU shapes are large
    f32 = {"device": device, "dtype": torch.float32}
    w = torch.randn(V, H, generator=g, **f32) / math.sqrt(H)
    u = torch.randn(H, generator=g, **f32)
    u /= u.norm()
    log_prior = -zipf_s * torch.log(torch.arange(1, V + 1, **f32))
    log_prior -= torch.logsumexp(log_prior, 0)
    # shuffle ranks so frequent tokens are not all at low ids (real vocabularies are not sorted by frequency)
    log_prior = log_prior[torch.randperm(V, generator=g, device=device)]
    w += (log_prior - log_prior.mean())[:, None] * u[None, :]
    N = S * T
    intended = torch.multinomial(log_prior.exp(), N, replacement=True, generator=g)
    beta = boost[0] + (boost[1] - boost[0]) * torch.rand(N, 1, generator=g, **f32)
    w_int = w[intended]
    x = u[None, :] + beta * w_int / w_int.norm(dim=1, keepdim=True) ** 2 + torch.randn(N, H, generator=g, **f32)
    del w_int
    x, w = x.to(dtype), w.to(dtype)
    labels = torch.empty(N, dtype=torch.long, device=device)
    ent = torch.zeros((), **f32)
    nll = torch.zeros((), **f32)
    step = max(1, (256 << 20) // (4 * V))  # fp32 logit rows per chunk while sampling
    for n0 in range(0, N, step):
        lp = torch.log_softmax(x[n0 : n0 + step].float() @ w.float().T, -1)
        yc = torch.multinomial(lp.exp(), 1, generator=g)[:, 0]
        labels[n0 : n0 + step] = yc
        ent -= (lp.exp() * lp).sum()
        nll -= lp.gather(1, yc[:, None]).sum()
        del lp
    ent, nll = float(ent), float(nll)
    stats = {
        "mean_entropy_nats": round(ent / N, 3),
        "mean_label_nll_nats": round(nll / N, 3),
        "uniform_entropy_nats": round(math.log(V), 3),
    }
    return x.view(S, T, H), w, labels.view(S, T), stats


# ------------------------------------------------------------------------------ profile split and MFU
# How profile_split files time: the first rule an event's op chain (the op, its parents, up to the step's
# ranges and the autograd engine's per-function events) or its kernel's name matches. Lower-case substrings.
OPTIMIZER_RANGE = "bench_step::optimizer"
SPLIT_RULES = (
    ("optimizer", (OPTIMIZER_RANGE,)),
    # our head's autograd Function (forward and its backward) and its Triton kernels, Liger's fused linear losses
    (
        "head",
        (
            "_linearlogprobs",
            "_partial_lse_kernel",
            "_combine_kernel",
            "_softmax_grad_rows_kernel",
            "_logit_grad_kernel",
            "_rows_lse_grad_kernel",
            "ligerfusedlinear",
            "linearcrossentropy",
            "linear_cross_entropy",
        ),
    ),
    ("attention", ("attention", "scaled_dot_product", "scaleddotproduct", "flash", "fmha", "varlen_attn")),
    (
        "body_gemm",
        ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mmbackward", "gemm", "nvjet"),
    ),
)
SPLIT_CATEGORIES = tuple(name for name, _ in SPLIT_RULES) + ("other", "idle")


def _category(chain: list[str]) -> str:
    low = [c.lower() for c in chain]
    for name, markers in SPLIT_RULES:
        if any(m in c for c in low for m in markers):
            return name
    return "other"


def profile_split(step, opt, cuda: bool) -> dict:
    """One more step (micro-batches + optimizer) under torch.profiler, its time split by category: attention,
    body GEMMs (every other matrix product of the body), head (forward and backward of the LM head + log-prob
    op), optimizer, other (norms, element-wise, copies, the loss), idle (wall time with no kernel running).
    CUDA: kernel time, filed by the op that launched it; CPU: each op's self CPU time (all threads)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        with record_function(OPTIMIZER_RANGE):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    ms = dict.fromkeys(SPLIT_CATEGORIES, 0.0)
    by_name = dict.fromkeys(SPLIT_CATEGORIES, 0.0)
    device_total = 0.0
    for e in prof.events():
        if "CPU" not in str(e.device_type):  # a kernel: by its name alone (the fallback below)
            d = e.time_range.elapsed_us() / 1e3
            device_total += d
            by_name[_category([e.name])] += d
            continue
        chain, p = [], e
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if cuda:
            for k in e.kernels:
                ms[_category(chain + [k.name])] += k.duration / 1e3
        else:
            ms[_category(chain)] += e.self_cpu_time_total / 1e3
    attribution = "by the launching op's chain"
    if cuda and not 0.9 * device_total <= sum(ms.values()) <= 1.1 * device_total:
        # kernels the profiler did not link to exactly one CPU op (e.g. launched outside aten): file them by name
        ms, attribution = by_name, "by kernel name (the ops' linked kernel time was off the total by over 10%)"
    busy = sum(ms.values())
    ms["idle"] = max(0.0, wall_ms - busy)
    return {
        "wall_ms": round(wall_ms, 2),
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "share": {k: round(v / max(wall_ms, busy, 1e-9), 3) for k, v in ms.items()},
        "kind": (
            "CUDA kernel time by the op that launched it; idle = wall time - kernel time (one stream)"
            if cuda
            else "self CPU time of each op (all threads); idle = wall time - that sum, floored at 0"
        ),
        "attribution": attribution if cuda else "by the op's chain",
        "rules": {name: list(markers) for name, markers in SPLIT_RULES},
    }


def model_flops(model, examples: list[dict]) -> dict:
    """The FLOPs one step must do for these examples, the same for every variant (MFU then orders the variants
    as tokens/s does): the four sequences of each example unpadded, through every decoder layer forward (2 per
    parameter per token) and backward for the input gradients (2; every layer needs them, except the first
    layer's q/k/v projections, whose input comes from frozen embeddings) and for the trainable parameters'
    gradients (2 each), causal attention scores (forward 2·T²·heads·head_dim per layer, backward twice that),
    and the frozen LM head on labelled rows (forward and input gradient, 2·H·V each). Embeddings, norms and
    element-wise work are not counted. (tests/test_gpu_check.py checks it against torch's FLOP counter.)"""
    import torch

    cfg = model.config
    layers = model.model.layers
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]  # norms' weights do no GEMM
    p_layers = sum(p.numel() for m in linears for p in m.parameters())
    p_train = sum(p.numel() for m in linears for p in m.parameters() if p.requires_grad)
    first = layers[0].self_attn
    frozen_below = not any(p.requires_grad for p in model.model.embed_tokens.parameters()) and not any(
        p.requires_grad for p in layers[0].input_layernorm.parameters()
    )
    p_no_input_grad = (
        sum(p.numel() for m in (first.q_proj, first.k_proj, first.v_proj) for p in m.parameters())
        if frozen_below
        else 0
    )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lens = [len(ids) for ex in examples for ids in ex["input_ids"]]
    labelled = sum(sum(1 for t in lab if t != -100) for ex in examples for lab in ex["labels"])
    tokens = sum(lens)
    linear = tokens * (4 * p_layers + 2 * p_train - 2 * p_no_input_grad)
    attention = 3 * sum(2 * T * T * cfg.num_attention_heads * head_dim for T in lens) * cfg.num_hidden_layers
    head = labelled * 4 * cfg.hidden_size * cfg.vocab_size
    return {
        "total": linear + attention + head,
        "linear": linear,
        "attention": attention,
        "head": head,
        "tokens": tokens,
        "labelled_tokens": labelled,
    }


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts, without sparsity): H100 and H200 989.4
# TFLOP/s (NVIDIA H100 / H200 Tensor Core GPU datasheets), A100 312 TFLOP/s (A100 datasheet).
DATASHEET_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
_PEAK: dict = {}


def peak_flops(device, dtype) -> dict:
    """FLOP/s to divide by: measured (the best of a few large matrix products in the run dtype, here) and the
    datasheet's dense bf16 peak for the GPU where the table has it."""
    import torch

    if "measured" not in _PEAK:
        n = 8192 if device.type == "cuda" else 512
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(5 if device.type == "cuda" else 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / 10)
        _PEAK["measured"] = 2 * n**3 / best
        _PEAK["measured_with"] = f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul, best of 5x10"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    sheet = next((v for k, v in DATASHEET_BF16_FLOPS.items() if k in name), None)
    return {
        "flops_per_s": {"measured": _PEAK["measured"], "datasheet_bf16_dense": sheet},
        "measured_with": _PEAK["measured_with"],
        "datasheet_source": "NVIDIA datasheets (dense bf16, SXM)" if sheet else None,
    }
