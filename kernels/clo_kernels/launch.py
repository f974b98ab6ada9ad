"""Host-side launchers for the kernels in `linear_logprobs.py` (grids, block sizes, buffers).

No autograd here: `clo_fast.ops` wraps these in a torch.autograd.Function. Nothing in this file reads a
tensor's values on the host, so the launches are free of host synchronisation. The forward makes its
logits with fp32-output cuBLAS chunks or with the streaming Triton GEMM (`LOGITS_GEMM`). On a GPU the
Triton GEMM kernels are autotuned once per shape over Hopper-friendly tile shapes (TMA loads among them
when a caller asks, `set_tma`); in Triton's CPU interpreter (TRITON_INTERPRET=1) they run with one small fixed tile.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

import torch
import triton
import triton.language as tl

from .linear_logprobs import (
    _combine_kernel,
    _logit_grad_kernel,
    _partial_lse_kernel,
    _rows_lse_grad_kernel,
    _softmax_grad_rows_kernel,
)


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_partial_lse_kernel).__name__ == "InterpretedFunction"


_INTERPRETER_TILE = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_H": 64}
# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages, use_tma); the first is the untuned default. BLOCK_N is
# 128 in every shape: the vocabulary-split grid is sized for 128-row blocks (`_vocab_splits`).
_POINTER_SHAPES = [
    (128, 128, 64, 8, 3, False),
    (128, 256, 64, 8, 3, False),
    (128, 128, 64, 4, 4, False),
    (128, 256, 64, 8, 4, False),
    (128, 128, 128, 8, 3, False),
]
_TMA_SHAPES = [
    (128, 128, 64, 8, 3, True),
    (128, 256, 64, 8, 3, True),
    (128, 256, 64, 8, 4, True),
    (128, 128, 128, 8, 3, True),
]


_ALL_GPU_SHAPES = _POINTER_SHAPES + _TMA_SHAPES  # every tile shape a GPU may run (the tests check each)
_TMA = {"enabled": False}  # the TMA tile shapes are opt-in (`set_tma`): off until timed on a GPU


def set_tma(enabled: bool) -> None:
    """Put the TMA tile shapes into the GPU autotune space (where `tma_available`), or take them out. Chosen by
    the caller — a benchmark's option —, never read from the environment; the next launch uses it."""
    _TMA["enabled"] = bool(enabled)


@functools.cache  # the GPU and the Triton build do not change in a process; asked on every launch when TMA is on
def tma_available() -> bool:
    """TMA tensor descriptors: Triton has them and the GPU is Hopper or newer."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def gpu_shapes() -> list[tuple]:
    """The autotune space now: the pointer-load tiles, plus the TMA tiles when set_tma(True) and available."""
    use_tma = _TMA["enabled"] and not interpreting() and tma_available()
    return _POINTER_SHAPES + (_TMA_SHAPES if use_tma else [])


_ROW_BLOCK = 128
# M (the running max per tile, for the softmax-gradient rows) is kept per GRAIN vocabulary columns:
# the smallest BLOCK_V of the tile space, so that every tile covers whole GRAIN groups.
_GRAIN = {True: _INTERPRETER_TILE["BLOCK_V"], False: min(c[1] for c in _ALL_GPU_SHAPES)}
_TUNE_MIN_VH = 1 << 24  # smaller heads run the default tile: tuning them costs more than it saves


def _cfg(bn, bv, bh, warps, stages, use_tma=False):
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "USE_TMA": use_tma}, num_warps=warps, num_stages=stages
    )


def _tma_scratch(size: int, alignment: int, stream):
    """Global memory for the tensor descriptors kernels make (Triton asks for it per launch)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


@functools.cache
def _autotuned(shapes: tuple[tuple, ...]) -> dict:
    """The GPU kernels over one autotune space ({name: (autotuned, fixed default tile)}), built once per space."""
    if any(c[5] for c in shapes):
        triton.set_allocator(_tma_scratch)
    return {
        name: (
            triton.autotune([_cfg(*c) for c in shapes], key=key)(k),
            triton.autotune([_cfg(*shapes[0])], key=[])(k),
        )
        for name, k, key in (("fwd", _partial_lse_kernel, ["H", "V", "STORE_P"]), ("grad", _logit_grad_kernel, ["H"]))
    }


_INTERPRETED = {"fwd": (_partial_lse_kernel,) * 2, "grad": (_logit_grad_kernel,) * 2}
_kernels: dict | None = None  # a fixed table instead of the autotuned ones (the per-tile tests, the TMA probe)


def _tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x, w))


def _kernel(name: str, x: torch.Tensor, w: torch.Tensor):
    """(kernel, extra launch kwargs): autotuned for large heads on GPU, fixed otherwise."""
    if interpreting():
        return (_kernels or _INTERPRETED)[name][0], dict(_INTERPRETER_TILE)
    shapes = tuple(gpu_shapes())
    tuned, fixed = (_kernels or _autotuned(shapes))[name]
    large = x.shape[1] * w.shape[0] >= _TUNE_MIN_VH
    tma_in_space = any(c[5] for c in shapes)
    return (tuned if large and (_tma_ok(x, w) or not tma_in_space) else fixed), {}


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a·b (cuBLAS), written in place when the dtypes allow it, else cast on the way in."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~3e-4 relative error); bf16/fp16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# How the forward makes the logits: "triton" — the streaming Triton GEMM with the online log-sum-exp (no
# fp32 logit chunk; the frozen head keeps P̃ in the input dtype): the default, the path measured on an H200
# (benchmarks/results/bench_head_h200.json). "cublas" — an fp32-output cuBLAS GEMM per row chunk, then one
# Triton pass per row (lse, logp, G into its own buffer): tested against float64, not yet timed on a GPU
# (benchmarks/NOTES.md). "auto" — cublas where torch offers an fp32-output GEMM for the dtype and the chunk
# fits in memory, else triton (an out-of-memory fallback is announced with a warning).
LOGITS_GEMM = "triton"  # the default; `use_logits_gemm` chooses another way for a block of code
LOGITS_GEMM_MODES = ("auto", "cublas", "triton")
_logits_gemm = contextvars.ContextVar("clo_kernels_logits_gemm", default=LOGITS_GEMM)


@contextlib.contextmanager
def use_logits_gemm(mode: str):
    """Within the block, the forward makes its logits `mode`'s way (a test pins one path, the benchmark times
    both) without changing the module's default for anyone else."""
    if mode not in LOGITS_GEMM_MODES:
        raise ValueError(f"logits_gemm must be one of {'|'.join(LOGITS_GEMM_MODES)}, got {mode!r}")
    token = _logits_gemm.set(mode)
    try:
        yield
    finally:
        _logits_gemm.reset(token)


# The cuBLAS path's chunk (see `cublas_chunk_rows`): its [C, V] buffers (fp32 logits + G) stay within this
# many bytes and within half the device's free memory; 1024 rows fit it at Llama-3 / Qwen-2.5 vocabularies.
CUBLAS_CHUNK_BUDGET_BYTES = 1 << 30
CUBLAS_CHUNK_ROWS_MAX = 1024
# Chunk sizes (bytes of [C, V] buffers) that ran out of memory under logits_gemm="auto", per device: later
# calls needing at least as much go straight to the streaming path (an out-of-memory error empties the
# caching allocator before it is raised, which a training step should not pay every time).
_CUBLAS_OOM_BYTES: dict[str, int] = {}


def _logits_fp32(x: torch.Tensor, w: torch.Tensor):
    """x·wᵀ with fp32 output (fp32 accumulation of the input-dtype product), or None where torch cannot.
    Out of memory is raised as such (it is not "cannot")."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.mm(x.float(), w.float().t())
    try:
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):  # no mm(out_dtype=) here (older torch; CPU)
        return None


def _free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can get on a CUDA device: the driver's free memory plus what torch's caching
    allocator holds unused. None off CUDA (host memory is not budgeted here)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def cublas_chunk_rows(V: int, g_bytes: int, device: torch.device) -> int:
    """Rows per chunk of the cuBLAS logits path. Memory rule: a chunk of C rows holds C·V fp32 logits and,
    for a frozen head's D, C·V gradient entries G of g_bytes each (0 without), i.e. C·V·(4 + g_bytes) bytes
    (6 per logit in bf16); C is the largest multiple of 128 with that within min(CUBLAS_CHUNK_BUDGET_BYTES,
    half the free device memory), capped at CUBLAS_CHUNK_ROWS_MAX (1024: the GEMMs are compute-bound there) and
    at least 128. At Llama-3's V = 128256 in bf16 1024 rows take 788 MB, at Qwen-2.5's 151936 934 MB."""
    budget = CUBLAS_CHUNK_BUDGET_BYTES
    free = _free_device_bytes(device)
    if free is not None:
        budget = min(budget, free // 2)
    rows = budget // max(1, V * (4 + g_bytes)) // 128 * 128
    return max(128, min(CUBLAS_CHUNK_ROWS_MAX, rows))


def forward(
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    ignore_index: int,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int = 0,
    n_splits: int | None = None,
    input_grad: bool = False,
    chunk_rows: int | None = None,
    logits_gemm: str | None = None,
):
    """lse [N] fp32, logp [N] fp32 (0 at ignored rows), per-sequence sums [num_seqs] fp32 (with seq_ids),
    and, with input_grad, D = dlogp/dx [N,H] (x.dtype) for a frozen head — else None.

    logits_gemm (default: the mode of an enclosing `use_logits_gemm`, else `LOGITS_GEMM`): "cublas" processes row
    chunks of fp32 logits (`cublas_chunk_rows`);
    "triton" streams the vocabulary and, with input_grad, keeps P̃ [chunk, V] in x.dtype (2 B/logit in bf16);
    "auto" is cublas where it can run, else triton. Out of device memory in the cuBLAS path: "auto" warns and
    falls back to triton (and skips cublas for chunks as large from then on), "cublas" raises
    torch.OutOfMemoryError naming the chunk.
    """
    mode = logits_gemm or _logits_gemm.get()
    if mode not in LOGITS_GEMM_MODES:
        raise ValueError(f"logits_gemm must be one of {'|'.join(LOGITS_GEMM_MODES)}, got {mode!r}")
    if mode != "triton" and x.shape[0] > 0:
        plan = _cublas_plan(x, w, input_grad, chunk_rows)
        known_oom = _CUBLAS_OOM_BYTES.get(str(x.device))
        if mode == "cublas" or known_oom is None or plan["bytes"] < known_oom:
            try:
                out = _forward_cublas(
                    x, w, y, ignore_index, seq_ids, num_seqs, input_grad, plan, strict=mode == "cublas"
                )
            except torch.OutOfMemoryError as e:
                what = (
                    f"the cuBLAS logits path ran out of device memory with chunks of {plan['rows']} rows × "
                    f"V {w.shape[0]} ({plan['bytes'] / 2**20:.0f} MiB of fp32 logits"
                    f"{' + G' if input_grad else ''})"
                )
                if mode == "cublas":
                    raise torch.OutOfMemoryError(
                        f"logits_gemm='cublas': {what}; pass a smaller chunk_rows or use 'auto' / 'triton'. "
                        f"Original error: {e}"
                    ) from e
                _CUBLAS_OOM_BYTES[str(x.device)] = min(plan["bytes"], known_oom or plan["bytes"])
                warnings.warn(
                    f"logits_gemm='auto': {what}; falling back to the streaming Triton path (and for chunks "
                    "this large from now on)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                out = None
            if out is not None:
                return out
    return _forward_streaming(x, w, y, ignore_index, seq_ids, num_seqs, n_splits, input_grad, chunk_rows)


def _cublas_plan(x, w, input_grad, chunk_rows) -> dict:
    """The cuBLAS path's chunk: rows, G's dtype and the bytes of its [rows, V] buffers (fp32 Z + G)."""
    N, V = x.shape[0], w.shape[0]
    g_dtype = torch.float32 if interpreting() or x.dtype == torch.float32 else x.dtype
    g_bytes = torch.finfo(g_dtype).bits // 8 if input_grad else 0
    rows = chunk_rows or cublas_chunk_rows(V, g_bytes, x.device)
    rows = max(1, min(rows, N))
    return {"rows": rows, "g_dtype": g_dtype, "bytes": rows * V * (4 + g_bytes)}


def _forward_cublas(x, w, y, ignore_index, seq_ids, num_seqs, input_grad, plan, strict):
    """Row chunks: Z = X_c·Wᵀ (cuBLAS, fp32 out), `_rows_lse_grad_kernel` (lse, logp, sums and G into a buffer
    of its own), D_c = G·W (cuBLAS). Returns None (caller falls back) when no fp32-output GEMM exists, unless
    strict. G never shares Z's memory: the rows kernel's warps store G while other warps of the same program
    may still be loading Z, and nothing orders the two (a bf16 G over the start of its fp32 row overwrote
    logits not yet read)."""
    N, H = x.shape
    V = w.shape[0]
    dev = x.device
    rows, g_dtype = plan["rows"], plan["g_dtype"]
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    has_seq = seq_ids is not None
    seq_sums = torch.zeros(max(num_seqs, 1), device=dev, dtype=torch.float32)
    D = torch.empty((N, H), device=dev, dtype=x.dtype) if input_grad else None
    G = torch.empty((rows, V), device=dev, dtype=g_dtype) if input_grad else None
    w_mm = w if w.dtype == g_dtype else w.to(g_dtype)
    block = 64 if interpreting() else 2048
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        z = _logits_fp32(x[n0:n1], w)
        if z is None:
            if strict:
                raise RuntimeError(
                    "logits_gemm='cublas' needs torch.mm(out_dtype=torch.float32) for "
                    f"{x.dtype} on {dev.type}; use 'triton' or 'auto'"
                )
            return None
        g = G[: n1 - n0] if input_grad else z  # without STORE_G the kernel never touches its G argument
        _rows_lse_grad_kernel[(n1 - n0,)](
            z,
            y[n0:n1],
            seq_ids[n0:n1] if has_seq else y[n0:n1],
            lse[n0:n1],
            logp[n0:n1],
            seq_sums,
            g,
            V,
            z.stride(0),
            g.stride(0),
            ignore_index,
            HAS_SEQ=has_seq,
            STORE_G=input_grad,
            BLOCK=block,
        )
        if input_grad:
            _mm_into(D[n0:n1], g, w_mm)
        del z
    return lse, logp, (seq_sums[:num_seqs] if has_seq else None), D


def _forward_streaming(x, w, y, ignore_index, seq_ids, num_seqs, n_splits, input_grad, chunk_rows):
    """The streaming Triton GEMM with online log-sum-exp (vocabulary splits + combine); with input_grad the
    rows are processed in chunks whose P̃ [C,V] (x.dtype) feeds the softmax-gradient rows and G·W."""
    N, H = x.shape
    V = w.shape[0]
    dev = x.device
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    has_seq = seq_ids is not None
    seq_sums = torch.zeros(max(num_seqs, 1), device=dev, dtype=torch.float32)
    g_dtype = torch.float32 if interpreting() else x.dtype
    grain = _GRAIN[interpreting()]
    if input_grad:
        elem_bytes = torch.finfo(g_dtype).bits // 8 + 4 / grain
        rows = chunk_rows or min(
            FROZEN_CHUNK_ROWS_MAX, default_chunk_rows(V, elem_bytes, budget_bytes=CHUNK_BUDGET_BYTES)
        )
        rows = max(1, min(rows, N))
        P = torch.empty((rows, V), device=dev, dtype=g_dtype)
        M = torch.empty((rows, triton.cdiv(V, grain)), device=dev, dtype=torch.float32)
        D = torch.empty((N, H), device=dev, dtype=x.dtype)
        w_mm = w if w.dtype == g_dtype else w.to(g_dtype)
    else:
        rows, P, M, D = N, None, None, None
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        xc, yc = x[n0:n1], y[n0:n1]
        _lse_chunk(
            xc,
            w,
            yc,
            lse[n0:n1],
            logp[n0:n1],
            seq_ids[n0:n1] if has_seq else None,
            seq_sums,
            ignore_index,
            n_splits,
            P,
            M,
            grain,
        )
        if input_grad:
            block = 64 if interpreting() else 2048
            _softmax_grad_rows_kernel[(n1 - n0, triton.cdiv(V, block))](
                P, M, yc, lse[n0:n1], V, P.stride(0), M.stride(0), ignore_index, BLOCK=block, GRAIN=grain
            )
            _mm_into(D[n0:n1], P[: n1 - n0], w_mm)
    return lse, logp, (seq_sums[:num_seqs] if has_seq else None), D


def _vocab_splits(N: int, V: int, device: torch.device) -> int:
    """Vocabulary splits for N rows: at least two programs per SM, and the grid (row blocks × splits) as
    close to a whole number of waves as the next few split counts allow (a last, part-empty wave idles SMs)."""
    sms = _num_sms(device)
    row_blocks = triton.cdiv(N, _ROW_BLOCK)
    least = max(1, min(64, triton.cdiv(2 * sms, row_blocks)))
    tiles = triton.cdiv(V, _GRAIN[interpreting()])

    def wave_waste(s):
        programs = row_blocks * s
        return triton.cdiv(programs, sms) * sms / programs

    candidates = list(range(least, min(2 * least, 64, tiles) + 1)) or [least]
    return min(candidates, key=lambda s: (round(wave_waste(s), 3), s))


def _lse_chunk(x, w, y, lse, logp, seq_ids, seq_sums, ignore_index, n_splits, P=None, M=None, grain=1):
    """Partial log-sum-exp over vocabulary splits, then the combine kernel (writes lse, logp, seq sums);
    with P/M also the within-tile probabilities and running maxima for the softmax-gradient rows."""
    N, H = x.shape
    V = w.shape[0]
    if n_splits is None:
        n_splits = _vocab_splits(N, V, x.device)
    part = torch.empty((3, n_splits, N), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_splits)  # noqa: E731
    kernel, tiles = _kernel("fwd", x, w)
    store = P is not None
    kernel[grid](
        x,
        w,
        y,
        part[0],
        part[1],
        part[2],
        P if store else part,
        M if store else part,
        N,
        V,
        H,
        x.stride(0),
        w.stride(0),
        P.stride(0) if store else 0,
        M.stride(0) if store else 0,
        n_splits,
        UPCAST=interpreting(),
        DOT_PRECISION=_dot_precision(x.dtype),
        STORE_P=store,
        GRAIN=grain,
        **tiles,
    )
    has_seq = seq_ids is not None
    block = 64 if interpreting() else 256
    _combine_kernel[(triton.cdiv(N, block),)](
        part[0],
        part[1],
        part[2],
        y,
        seq_ids if has_seq else y,
        lse,
        logp,
        seq_sums,
        N,
        n_splits,
        ignore_index,
        HAS_SEQ=has_seq,
        BLOCK=block,
        SPLITS_P2=triton.next_power_of_2(n_splits),
    )


# Bytes of [chunk, V] buffers per head call: the frozen forward's P̃ (+M), the trainable backward's G.
CHUNK_BUDGET_BYTES = 384 << 20
# The frozen forward's chunk never exceeds this many rows: its P̃ buffer then scales with V (≈ 2 KB per
# vocabulary entry in bf16), keeping small-vocabulary heads small too; 1024-row GEMMs stay compute-bound.
FROZEN_CHUNK_ROWS_MAX = 1024


def default_chunk_rows(V: int, elem_bytes: float, budget_bytes: int = 256 << 20) -> int:
    """Rows per chunk so that the [C, V] buffers (elem_bytes per element in all) stay within `budget_bytes`."""
    rows = max(128, int(budget_bytes // max(1, V * elem_bytes)))
    return rows // 128 * 128


def backward(
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    need_dw: bool,
    chunk_cols: int | None = None,
):
    """dX [N,H] (x.dtype) and dW [V,H] (w.dtype; only when need_dw) for upstream gradient `grad` [N] of logp,
    which must be 0 at ignored rows.

    Per vocabulary slice of Vc columns: the logit-gradient kernel writes G [N,Vc], then dW_slice = Gᵀ·X (one
    GEMM into dW's own rows) and dX += G·W_slice (fp32 accumulator [N,H]).
    """
    N, H = x.shape
    V = w.shape[0]
    g_dtype = torch.float32 if interpreting() else x.dtype
    if chunk_cols is None:
        chunk_cols = default_chunk_cols(N, torch.finfo(g_dtype).bits // 8, CHUNK_BUDGET_BYTES)
    chunk_cols = max(1, min(chunk_cols, V))
    G = torch.empty((N, chunk_cols), device=x.device, dtype=g_dtype)
    dx = torch.zeros((N, H), device=x.device, dtype=torch.float32)
    dw = torch.empty((V, H), device=x.device, dtype=g_dtype) if need_dw else None
    w_mm = w if w.dtype == g_dtype else w.to(g_dtype)
    x_mm = x if x.dtype == g_dtype else x.to(g_dtype)
    kernel, tiles = _kernel("grad", x, w)
    for v0 in range(0, V, chunk_cols):
        v1 = min(v0 + chunk_cols, V)
        grid = lambda meta, cols=v1 - v0: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(cols, meta["BLOCK_V"]))  # noqa: E731
        kernel[grid](
            x,
            w,
            y,
            lse,
            grad,
            G,
            0,
            N,
            v0,
            v1,
            H,
            x.stride(0),
            w.stride(0),
            G.stride(0),
            UPCAST=interpreting(),
            DOT_PRECISION=_dot_precision(x.dtype),
            **tiles,
        )
        g = G[:, : v1 - v0]
        if g_dtype == torch.float32:
            dx.addmm_(g, w_mm[v0:v1])
        else:  # the GEMM accumulates in fp32 inside; its [N,H] result is added in fp32 across slices
            dx.add_(torch.mm(g, w_mm[v0:v1]))
        if need_dw:
            torch.mm(g.t(), x_mm, out=dw[v0:v1])
    return dx.to(x.dtype), (dw.to(w.dtype) if need_dw else None)


def default_chunk_cols(N: int, elem_bytes: int, budget_bytes: int) -> int:
    """Vocabulary columns per slice so that G [N, cols] stays within `budget_bytes` (a multiple of 128)."""
    cols = max(128, budget_bytes // max(1, N * elem_bytes))
    return cols // 128 * 128
