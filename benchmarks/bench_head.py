"""LM head + CLO loss, forward and backward: ours against the peers a user would pick, on LM-like inputs.

Every path computes the CLO loss (λ = 0.5, β = 0.1, reference log-probs precomputed) of a padded batch of
4B sequences with the realistic length profile and LM-like logits of `benchmarks/common.py`:
  fused          ours as the trainer runs it: only the labelled rows (indices built on the host with the
                 batch) gathered and sent through `clo_fast.ops.packed_sequence_logprobs`, then clo_loss
  fused_padded   ours on every padded row (`sequence_logprobs`), the trainer before row selection
  fused_cublas   (GPU) `fused` with fp32-output cuBLAS logit chunks instead of the streaming Triton GEMM
  liger          TRL + Liger semantics: LigerFusedLinearDPOLoss on the padded batch, one call per
                 direction, the NLL on the target direction (use_ref_model=False: with precomputed
                 reference log-probs the reference terms are a subtraction, no extra GEMM)
  cce            cut-cross-entropy linear_cross_entropy(reduction="none") on the padded batch + the same
                 DPO tail (clo_loss)
  reference      materialized fp32 logits + log-softmax (TRL without Liger)
The floor is the cuBLAS time of the GEMMs the head must do, on the labelled rows only: frozen head
X·Wᵀ and G·W; trainable head also Gᵀ·X. Timings are interleaved across paths (median, p10, p90);
peak memory is above the inputs; errors are against fp32 from the same rounded inputs (per-sequence
sums where the path exposes them, the loss, and dX).

    python benchmarks/bench_head.py                      # CPU: scaled-down shapes
    python benchmarks/bench_head.py --out results.json   # GPU: Llama-3-8B, Qwen-2.5-3B, Mistral-7B heads
    python benchmarks/bench_head.py --paths all          # also fused_padded and reference
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import torch
from common import (
    apply_tma_request,
    arg_parser,
    cuda_peak_mb,
    interleaved_timings,
    label_mask,
    lm_like_head_inputs,
    machine_info,
    results_path,
    utc_now,
    versions,
    write_json,
)

from clo_fast.loss import clo_loss  # noqa: E402
from clo_fast.ops import packed_sequence_logprobs, sequence_logprobs  # noqa: E402

GPU_SHAPES = {"llama3-8b": (4096, 128256), "qwen2.5-3b": (2048, 151936), "mistral-7b": (4096, 32000)}
CPU_SHAPES = {"cpu-small": (256, 8000), "tiny": (64, 512)}  # tiny: gpu_check's CPU dry run
# --paths default: what the GPU check times (the padded and materialized paths are slow and already measured)
DEFAULT_PATHS = ("fused", "fused_cublas", "liger", "cce")
BETA, LAM = 0.1, 0.5


# ------------------------------------------------------------------------------------------ inputs
def make_case(profile, B, H, V, dtype, device, head_trains, seed=0):
    """Padded hidden [4B,T,H] (requires grad), weight, labels with prompt/padding ignored, reference
    log-probs, and the host-built labelled-row index, plus the logit statistics."""
    mask = label_mask(profile, B, seed)
    S, T = mask.shape
    hidden, w, labels, stats = lm_like_head_inputs(S, T, H, V, dtype, device, seed=seed)
    labels = torch.where(mask.to(device), labels, -100)
    rows = mask.reshape(-1).nonzero()[:, 0]  # host: the trainer builds this with the batch
    case = {
        "hidden": hidden.requires_grad_(True),
        "w": w.requires_grad_(head_trains),
        "labels": labels,
        "ref": (-2.5 * mask.sum(1).view(B, 4).double() - torch.rand(B, 4, dtype=torch.float64)).to(device),
        "rows": rows.to(device),
        "seq": (rows // T).to(device),
        "n_tokens": mask.sum(1).view(B, 4).to(device),
        "S": S,
        "T": T,
        "B": B,
    }
    stats.update(
        labelled_rows=int(rows.numel()), padded_rows=S * T, unlabelled_share=round(1 - rows.numel() / (S * T), 3)
    )
    return case, stats


def _loss_from_logps(c, logps):
    loss, _ = clo_loss(logps.view(c["B"], 4), c["ref"].to(logps.dtype), c["n_tokens"], BETA, LAM, validate=False)
    return loss


# ------------------------------------------------------------------------------------------- paths
def fused_logps(c):
    S, T, H = c["hidden"].shape
    x = c["hidden"].reshape(S * T, H).index_select(0, c["rows"])
    return packed_sequence_logprobs(x, c["w"], c["labels"].reshape(-1).index_select(0, c["rows"]), c["seq"], S)


def fused_padded_logps(c):
    return sequence_logprobs(c["hidden"], c["w"], c["labels"])


def reference_logps(c):
    logits = (c["hidden"] @ c["w"].T).float()
    lp = torch.log_softmax(logits, -1)
    valid = c["labels"] != -100
    tok = lp.gather(2, torch.where(valid, c["labels"], 0)[..., None])[..., 0]
    return torch.where(valid, tok, 0.0).sum(1)


def cce_logps(c):
    from cut_cross_entropy import linear_cross_entropy

    S, T, H = c["hidden"].shape
    nll = linear_cross_entropy(
        c["hidden"].reshape(-1, H), c["w"], c["labels"].reshape(-1), reduction="none", shift=False
    )
    return -nll.float().reshape(S, T).sum(1)


def _logps_path(logps_fn):
    def run(c):
        loss = _loss_from_logps(c, logps_fn(c))
        loss.backward()
        return loss

    return run


def make_liger():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    with_nll = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=True, use_ref_model=False)
    dpo_only = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=False, use_ref_model=False)

    def run(c):
        h, y = c["hidden"], c["labels"]
        # Liger wants [chosen; rejected] stacked: English direction (0 vs 1), target direction (2 vs 3)
        out_en = dpo_only(c["w"], torch.cat([h[0::4], h[1::4]]), torch.cat([y[0::4], y[1::4]]))
        out_tg = with_nll(c["w"], torch.cat([h[2::4], h[3::4]]), torch.cat([y[2::4], y[3::4]]))
        loss = (out_en[0] if isinstance(out_en, tuple) else out_en) + (
            out_tg[0] if isinstance(out_tg, tuple) else out_tg
        )
        loss.backward()
        return loss

    return run


def _with_logits_gemm(mode, fn):
    """Run a path with the head's forward making its logits one way ("cublas" or "triton"; see launch.py)."""
    import clo_kernels.launch as launch

    def run(c):
        with launch.use_logits_gemm(mode):
            return fn(c)

    return run


def available_paths(gpu: bool) -> dict:
    paths = {"fused": _logps_path(fused_logps), "fused_padded": _logps_path(fused_padded_logps)}
    if gpu:  # the other way to make the logits, measured in the same run (launch.LOGITS_GEMM is the default)
        paths["fused_cublas"] = _with_logits_gemm("cublas", _logps_path(fused_logps))
    if gpu:
        with contextlib.suppress(ImportError):
            paths["liger"] = make_liger()
        if importlib.util.find_spec("cut_cross_entropy") is not None:
            paths["cce"] = _logps_path(cce_logps)
    paths["reference"] = _logps_path(reference_logps)
    return paths


# ------------------------------------------------------------------------------------------ checks
def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def accuracy(paths, c):
    """Per path: relative error of the loss and of dX (and of the per-sequence sums where exposed) against
    fp32 computed from the same rounded inputs."""

    def grad_of(fn):
        c["hidden"].grad = None
        loss = fn(c)
        return float(loss.detach()), c["hidden"].grad.detach().clone()

    h32 = c["hidden"].detach().float().requires_grad_(True)
    c32 = dict(c, hidden=h32, w=c["w"].detach().float())
    ref_sums = reference_logps(c32)
    ref_loss = _loss_from_logps(c32, ref_sums)
    ref_loss.backward()
    out = {}
    for name, fn in paths.items():
        if name == "reference":
            continue
        try:
            loss, dx = grad_of(fn)
            err = {"loss": _rel(torch.tensor(loss), ref_loss.detach()), "dx": _rel(dx, h32.grad)}
            sums_fn = {
                "fused": fused_logps,
                "fused_padded": fused_padded_logps,
                "cce": cce_logps,
                "fused_cublas": _with_logits_gemm("cublas", fused_logps),
            }.get(name)
            if sums_fn is not None:
                with torch.no_grad():
                    err["sequence_sums"] = _rel(sums_fn(c), ref_sums.detach())
            if name == "liger":
                err["note"] = "Liger's loss averages the NLL per token over its own batch: compare dX and timings"
            out[name] = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in err.items()}
        except Exception as e:  # recorded, not fatal
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    c["hidden"].grad = None
    return out


def gemm_floor(c, head_trains, device, reps):
    """cuBLAS time of the GEMMs the head must do on the labelled rows: X·Wᵀ and G·W (+ Gᵀ·X if W trains)."""
    import triton.testing

    n = int(c["rows"].numel())
    H = c["hidden"].shape[-1]
    w = c["w"].detach()
    x = torch.randn(n, H, device=device, dtype=w.dtype)
    g = torch.randn(n, w.shape[0], device=device, dtype=w.dtype)
    parts = {
        "x_wT": triton.testing.do_bench(lambda: x @ w.T, rep=reps * 10, return_mode="median"),
        "g_w": triton.testing.do_bench(lambda: g @ w, rep=reps * 10, return_mode="median"),
    }
    if head_trains:
        parts["gT_x"] = triton.testing.do_bench(lambda: g.T @ x, rep=reps * 10, return_mode="median")
    return round(sum(parts.values()), 3), {k: round(v, 3) for k, v in parts.items()}


def kernel_breakdown(fn, c, top=8):
    """CUDA kernel time (ms) by kernel name over one fwd+bwd of a path, largest first."""
    from torch.profiler import ProfilerActivity, profile

    c["hidden"].grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(c)
        torch.cuda.synchronize()
    # self device time: kernels only (an operator's total would count its kernels a second time)
    rows = [(e.key, getattr(e, "self_device_time_total", 0) / 1e3) for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: -r[1])
    c["hidden"].grad = None
    return {k[:80]: round(v, 3) for k, v in rows[:top]}


def select_paths(paths: dict, spec: str) -> dict:
    """The paths --paths names: 'all', 'default' (DEFAULT_PATHS where available) or a comma list (each must exist)."""
    if spec == "all":
        return paths
    if spec == "default":
        return {k: v for k, v in paths.items() if k in DEFAULT_PATHS}
    names = [n for n in spec.split(",") if n]
    missing = [n for n in names if n not in paths]
    if missing:
        raise SystemExit(f"--paths: {missing} not available here (available: {', '.join(paths)})")
    return {n: paths[n] for n in names}


def tma_in_tile_space() -> bool:
    """Whether the autotune space holds TMA tile shapes (CLO_TMA=1 on Hopper: common.apply_tma_request)."""
    import clo_kernels.launch as launch

    return any(c[5] for c in launch.gpu_shapes())


def tuned_configs() -> dict:
    """The tile shapes the autotuner picked for our kernels (for the record)."""
    import clo_kernels.launch as launch

    return {name: str(getattr(kernels[0], "best_config", None)) for name, kernels in launch._kernels.items()}


# -------------------------------------------------------------------------------------------- main
def measure_row(shape_name, H, V, head, paths, args, B, reps, dtype, gpu) -> dict:
    """One shape × head: every path's time (interleaved), on GPU its peak memory, the cuBLAS floor, the fused
    path's kernels and the ratios to it; the accuracy of every path."""
    dev = args.device
    head_trains = head == "trainable"
    c, stats = make_case(args.profile, B, H, V, dtype, dev, head_trains)
    row = {"shape": shape_name, "H": H, "V": V, "head": head, "inputs": stats, "errors": {}}
    fns = {name: (lambda fn=fn, c=c: fn(c)) for name, fn in paths.items()}

    def on_error(name, e, row=row):
        row["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"

    def clear_grads(c=c):
        c["hidden"].grad = None
        c["w"].grad = None

    timed = {name: (lambda f=f: (clear_grads(), f())) for name, f in fns.items()}
    row["ms"] = interleaved_timings(timed, dev, warmup=2, reps=reps, on_error=on_error)
    if gpu:
        row["peak_mb"] = {}
        for name in row["ms"]:
            clear_grads()
            row["peak_mb"][name] = round(cuda_peak_mb(timed[name]), 1)
        floor, parts = gemm_floor(c, head_trains, dev, reps)
        row["floor_ms"], row["floor_parts_ms"] = floor, parts
        if "fused" in paths:
            row["fused_kernels_ms"] = kernel_breakdown(paths["fused"], c)
        f = row["ms"].get("fused", {}).get("median")
        if f:
            row["fused_over_floor"] = round(f / floor, 3)
            row["speedup_of_fused"] = {k: round(v["median"] / f, 3) for k, v in row["ms"].items() if k != "fused"}
            mf = row["peak_mb"].get("fused")
            row["memory_over_fused"] = {k: round(v / mf, 2) for k, v in row["peak_mb"].items() if mf and k != "fused"}
    row["accuracy"] = accuracy(paths, c)
    if gpu:
        row["autotuned"] = tuned_configs()
        row["tma_in_tile_space"] = tma_in_tile_space()
    clear_grads()
    return row


def main(argv=None):
    apply_tma_request()
    ap = arg_parser(__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*", help="subset of shape names")
    ap.add_argument("--profile", default="oasst", help="length profile (benchmarks/common.py)")
    ap.add_argument("--examples", type=int, default=None, help="B (4B sequences); default 4 on GPU, 1 on CPU")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--heads", nargs="*", default=["frozen", "trainable"])
    ap.add_argument(
        "--paths",
        default="default",
        help=f"comma list of paths to time, 'default' ({','.join(DEFAULT_PATHS)}: those available here) or 'all'",
    )
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_head_<device>.json)")
    args = ap.parse_args(argv)

    dev = args.device
    gpu = dev.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    B = args.examples or (4 if gpu else 1)
    reps = args.reps or (9 if gpu else 3)
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes}
    paths = select_paths(available_paths(gpu), args.paths)
    result = {
        "device": machine_info(dev),
        "versions": versions(),
        "dtype": str(dtype),
        "profile": args.profile,
        "examples": B,
        "reps": reps,
        "time": utc_now(),
        "clo_tma": os.environ.get("CLO_TMA"),  # TMA tiles asked for (gpu_check sets it for its TMA step only)
        "rows": [],
    }
    out = args.out or str(results_path(f"bench_head_{dev.split(':')[0]}.json"))
    for shape_name, (H, V) in shapes.items():
        for head in args.heads:
            row = measure_row(shape_name, H, V, head, paths, args, B, reps, dtype, gpu)
            if gpu:  # free this shape's inputs before the next one is made
                torch.cuda.empty_cache()
            result["rows"].append(row)
            write_json(out, result)  # after every row: a run cut short by a time limit still leaves its numbers
            print(json.dumps(row), flush=True)
    write_json(out, result)
    print_table(result)
    print(f"\nwrote {out}")


def print_table(result):
    print(f"\n## bench_head on {result['device']} ({result['dtype']}, profile {result['profile']})\n")
    names = sorted({k for r in result["rows"] for k in r["ms"]}, key=lambda k: (k != "fused", k))
    print(
        "| shape | head | rows (labelled) | floor ms | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(f"{n} MB" for n in names)
        + " |"
    )
    print("|" + "---|" * (4 + 2 * len(names)))
    for r in result["rows"]:
        ms = " | ".join(str(r["ms"].get(n, {}).get("median", "-")) for n in names)
        mb = " | ".join(str(r.get("peak_mb", {}).get(n, "-")) for n in names)
        i = r["inputs"]
        print(
            f"| {r['shape']} | {r['head']} | {i['padded_rows']} ({i['labelled_rows']}) | {r.get('floor_ms', '-')} "
            f"| {ms} | {mb} |"
        )
        if r["errors"]:
            print(f"|   errors: {r['errors']} |")


if __name__ == "__main__":
    main()
