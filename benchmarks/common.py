"""Shared benchmark utilities: machine and version facts, interleaved timing,
peak memory, realistic inputs (length profiles, LM-like head inputs), and a step's profile split and model
FLOPs / MFU (`profile_split`, `model_flops`, `peak_flops`).

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

import math
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # where results/ lives; the project itself is imported installed

import torch

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
