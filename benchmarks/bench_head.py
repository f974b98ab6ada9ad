"""Head + CLO loss benchmark: forward+backward time and peak memory, ours against the reference and peers.

Paths, all computing the CLO loss of DESIGN.md §1 from hidden states [4B,T,H] and the head weight [V,H]:
  fused        clo_fast.ops.sequence_logprobs (Triton on GPU, chunked torch on CPU) + clo_loss
  reference    materialized logits + reference_clo_loss (fp32 log-softmax)
  liger        Liger-Kernel LigerFusedLinearDPOLoss, one call per direction, NLL on the target direction
               (use_ref_model=False: reference log-probs are precomputed in CLO, so no extra ref GEMM)
  cce          cut-cross-entropy linear_cross_entropy(reduction="none") + the same DPO tail (clo_loss)
  gemm_floor   (GPU) cuBLAS matmuls with the same FLOPs: fwd X·Wᵀ, bwd recompute X·Wᵀ + G·W (+ Gᵀ·X if dW)
each with a frozen head (attention-only CLO) and a trainable head. Liger / cut-cross-entropy are used
only where installed.

    python benchmarks/bench_head.py                      # CPU: scaled-down shapes + the fallback memory check
    python benchmarks/bench_head.py --out results.json   # GPU: DESIGN.md §6 shapes

Output: JSON (device, versions, shapes, median ms, peak MB, ratios) and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clo_fast.loss import clo_loss, reference_clo_loss  # noqa: E402
from clo_fast.ops import sequence_logprobs  # noqa: E402

GPU_SHAPES = {  # name: (H, V)
    "llama3-8b": (4096, 128256),
    "qwen2.5-3b": (2048, 151936),
    "mistral-7b": (4096, 32000),
}
CPU_SHAPES = {"cpu-small": (256, 8000), "cpu-medium": (512, 32000)}


# ------------------------------------------------------------------------------------------ inputs
def make_batch(B, T, H, V, dtype, device, seed=0, head_trains=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4 * B, T, H, generator=g).to(dtype).to(device).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype).to(device).requires_grad_(head_trains)
    labels = torch.randint(0, V, (4 * B, T), generator=g)
    labels[:, : T // 4] = -100  # prompt tokens carry no label
    labels = labels.to(device)
    ref = (-torch.rand(B, 4, generator=g) * 50 - 3 * T).to(device)
    return hidden, w, labels, ref


# ------------------------------------------------------------------------------------------- paths
def run_fused(hidden, w, labels, ref, impl="auto"):
    B = hidden.shape[0] // 4
    logps = sequence_logprobs(hidden, w, labels, impl=impl)
    n = (labels != -100).sum(1).view(B, 4)
    loss, _ = clo_loss(logps.view(B, 4), ref, n, 0.1, 0.5, validate=False)
    loss.backward()


def run_reference(hidden, w, labels, ref):
    logits = hidden @ w.T
    loss, _ = reference_clo_loss(logits, labels, ref, 0.1, 0.5, validate=False)
    loss.backward()


def run_cce(hidden, w, labels, ref):
    from cut_cross_entropy import linear_cross_entropy

    B, T, H = hidden.shape[0] // 4, hidden.shape[1], hidden.shape[2]
    nll = linear_cross_entropy(hidden.reshape(-1, H), w, labels.reshape(-1), reduction="none", shift=False)
    logps = -nll.float().reshape(4 * B, T).sum(1)  # 0 where ignored
    n = (labels != -100).sum(1).view(B, 4)
    loss, _ = clo_loss(logps.view(B, 4), ref, n, 0.1, 0.5, validate=False)
    loss.backward()


def make_liger():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    nll_loss = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=True, use_ref_model=False)
    dpo_only = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=False, use_ref_model=False)

    def run_liger(hidden, w, labels, ref):
        # Liger wants [chosen; rejected] stacked: English direction (0 vs 1), target direction (2 vs 3)
        en_x = torch.cat([hidden[0::4], hidden[1::4]])
        en_y = torch.cat([labels[0::4], labels[1::4]])
        tg_x = torch.cat([hidden[2::4], hidden[3::4]])
        tg_y = torch.cat([labels[2::4], labels[3::4]])
        out_en = dpo_only(w, en_x, en_y)
        out_tg = nll_loss(w, tg_x, tg_y)
        loss = (out_en[0] if isinstance(out_en, tuple) else out_en) + (out_tg[0] if isinstance(out_tg, tuple) else out_tg)
        loss.backward()

    return run_liger


# ----------------------------------------------------------------------------------------- timing
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_and_memory(fn, make_inputs, device, warmup, reps):
    """Median ms of fwd+bwd over `reps` runs (fresh grads each run) and peak extra memory in MB."""
    inputs = make_inputs()
    for _ in range(warmup):
        fn(*inputs)
        inputs[0].grad = None
        inputs[1].grad = None
    _sync(device)
    times = []
    for _ in range(reps):
        inputs[0].grad = None
        inputs[1].grad = None
        _sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    peak_mb = None
    if device == "cuda":
        inputs[0].grad = None
        inputs[1].grad = None
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*inputs)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    del inputs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), peak_mb


def gemm_floor_ms(N, H, V, dtype, head_trains, reps=20):
    """cuBLAS time for the FLOPs the head must do: fwd 2NHV; bwd 2NHV recompute + 2NHV dX (+ 2NHV dW)."""
    import triton.testing

    x = torch.randn(N, H, device="cuda", dtype=dtype)
    w = torch.randn(V, H, device="cuda", dtype=dtype)
    g = torch.randn(N, V, device="cuda", dtype=dtype)
    t_xw = triton.testing.do_bench(lambda: x @ w.T, rep=reps * 10, return_mode="median")
    t_gw = triton.testing.do_bench(lambda: g @ w, rep=reps * 10, return_mode="median")
    t_gx = triton.testing.do_bench(lambda: g.T @ x, rep=reps * 10, return_mode="median") if head_trains else 0.0
    del x, w, g
    torch.cuda.empty_cache()
    return 2 * t_xw + t_gw + t_gx


# ------------------------------------------------------------------------------ CPU memory check
_MEM_CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.bench_head import make_batch, run_fused, run_reference
torch.set_num_threads(2)
h, w, y, ref = make_batch({B}, {T}, {H}, {V}, torch.float32, "cpu")
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # kB
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
base = status("VmRSS:")
{fn}(h, w, y, ref{extra})
print((status("VmHWM:") - base) / 1024)
"""


def cpu_peak_mb(fn_name, B, T, H, V, extra=""):
    """Peak resident memory above the inputs (MB) of one fwd+bwd, in a fresh process (Linux VmHWM)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEM_CHILD.format(root=root, B=B, T=T, H=H, V=V, fn=fn_name, extra=extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    return float(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "liger_kernel", "cut_cross_entropy"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "installed")
        except Exception:
            v[mod] = None
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*", help="subset of shape names")
    ap.add_argument("--examples", type=int, default=None, help="B (4B sequences); default 2 on GPU, 1 on CPU")
    ap.add_argument("--seq-len", type=int, default=None, help="T per sequence; default 1024 on GPU, 256 on CPU")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--skip-memcheck", action="store_true", help="CPU: skip the N=8192,V=32000,H=512 memory check")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_head_<device>.json)")
    args = ap.parse_args(argv)

    dev = args.device
    gpu = dev == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    B = args.examples or (2 if gpu else 1)
    T = args.seq_len or (1024 if gpu else 256)
    reps = args.reps or (10 if gpu else 3)
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes}
    device_name = torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    paths = {"fused": run_fused, "reference": run_reference}  # peers after ours: a slow peer cannot hide our numbers
    try:
        import cut_cross_entropy  # noqa: F401

        if gpu:
            paths["cce"] = run_cce
    except ImportError:
        pass
    try:
        paths["liger"] = make_liger()
    except ImportError:
        pass

    rows = []
    result = {"device": device_name, "versions": versions(), "dtype": str(dtype), "rows": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"bench_head_{dev}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def save():  # after every row: a run cut short by a time limit still leaves its numbers
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)

    for shape_name, (H, V) in shapes.items():
        N = 4 * B * T
        for head_trains in (False, True):
            row = {"shape": shape_name, "H": H, "V": V, "N": N, "B": B, "T": T, "dtype": str(dtype),
                   "head": "trainable" if head_trains else "frozen", "ms": {}, "peak_mb": {}, "errors": {}}
            for name, fn in paths.items():
                if name == "liger" and not gpu:
                    continue  # Liger's Triton kernels need CUDA
                try:
                    ms, mb = time_and_memory(fn, lambda: make_batch(B, T, H, V, dtype, dev, head_trains=head_trains),
                                             dev, warmup=2, reps=reps)
                    row["ms"][name], row["peak_mb"][name] = round(ms, 3), (round(mb, 1) if mb is not None else None)
                except Exception as e:  # a peer failing on a shape is a result, not a crash
                    row["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
                    if gpu:
                        torch.cuda.empty_cache()
            if gpu:
                row["ms"]["gemm_floor"] = round(gemm_floor_ms(N, H, V, dtype, head_trains), 3)
            f = row["ms"].get("fused")
            row["ratios"] = {f"fused_vs_{k}": round(f / v, 3) for k, v in row["ms"].items() if f and k != "fused"}
            mf = row["peak_mb"].get("fused")
            row["memory_ratios"] = {f"{k}_over_fused": round(v / mf, 2) for k, v in row["peak_mb"].items()
                                    if mf and v and k != "fused"}
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
    if not gpu and not args.skip_memcheck:
        # Issue 3's acceptance check: fallback peak memory vs the reference at N=8192, V=32000, H=512 (fp32)
        mem = {"N": 8192, "V": 32000, "H": 512, "dtype": "float32"}
        mem["fused_torch_peak_mb"] = round(cpu_peak_mb("run_fused", 8, 256, 512, 32000, extra=', impl="torch"'), 1)
        mem["reference_peak_mb"] = round(cpu_peak_mb("run_reference", 8, 256, 512, 32000), 1)
        mem["fused_over_reference"] = round(mem["fused_torch_peak_mb"] / mem["reference_peak_mb"], 4)
        result["cpu_memory_check"] = mem
        print(json.dumps(mem), flush=True)

    save()
    print_table(result)
    print(f"\nwrote {out}")


def print_table(result):
    print(f"\n## bench_head on {result['device']} ({result['dtype']})\n")
    names = sorted({k for r in result["rows"] for k in r["ms"]}, key=lambda k: (k != "fused", k))
    print("| shape | N | head | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(f"{n} MB" for n in names if n != "gemm_floor") + " |")
    print("|" + "---|" * (3 + 2 * len(names) - ("gemm_floor" in names)))
    for r in result["rows"]:
        ms = " | ".join(str(r["ms"].get(n, "-")) for n in names)
        mb = " | ".join(str(r["peak_mb"].get(n, "-")) for n in names if n != "gemm_floor")
        print(f"| {r['shape']} | {r['N']} | {r['head']} | {ms} | {mb} |")
        if r["errors"]:
            print(f"|   errors: {r['errors']} |")
    if "cpu_memory_check" in result:
        m = result["cpu_memory_check"]
        print(f"\nCPU fallback peak {m['fused_torch_peak_mb']} MB vs reference {m['reference_peak_mb']} MB "
              f"= {100 * m['fused_over_reference']:.1f}% (N={m['N']}, V={m['V']}, H={m['H']}, fp32)")


if __name__ == "__main__":
    main()
