"""Host-side launchers for the kernels in `linear_logprobs.py` (grids, block sizes, buffers).

No autograd here: `clo_fast.ops` wraps these in a torch.autograd.Function. Nothing in this file reads a
tensor's values on the host, so the launches are free of host synchronisation. On a GPU the two big
kernels are autotuned once per (H, V) over a few Hopper-friendly tile shapes; in Triton's CPU
interpreter (TRITON_INTERPRET=1) they run with one small fixed tile shape.
"""
from __future__ import annotations

import torch
import triton

from .linear_logprobs import _combine_kernel, _logit_grad_kernel, _partial_lse_kernel


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_partial_lse_kernel).__name__ == "InterpretedFunction"


_INTERPRETER_TILE = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=64)


def _gpu_configs():
    shapes = [  # (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages)
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
        (64, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 2),
    ]
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh), num_warps=w, num_stages=s)
            for bn, bv, bh, w, s in shapes]


if interpreting():
    _fwd_kernel, _grad_kernel = _partial_lse_kernel, _logit_grad_kernel
else:
    _fwd_kernel = triton.autotune(_gpu_configs(), key=["H", "V"])(_partial_lse_kernel)
    _grad_kernel = triton.autotune(_gpu_configs(), key=["H", "V"])(_logit_grad_kernel)


def _tile_args():
    return dict(_INTERPRETER_TILE) if interpreting() else {}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~3e-4 relative error); bf16/fp16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def forward(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ignore_index: int,
            seq_ids: torch.Tensor | None = None, num_seqs: int = 0, n_splits: int | None = None):
    """lse [N] fp32, logp [N] fp32 (0 at ignored rows) and, with seq_ids, per-sequence sums [num_seqs] fp32."""
    N, H = x.shape
    V = w.shape[0]
    if n_splits is None:  # split the vocabulary so that about 2 programs per SM run, given 128-row blocks
        n_splits = max(1, min(64, triton.cdiv(2 * _num_sms(x.device), triton.cdiv(N, 128))))
    dev = x.device
    part = torch.empty((3, n_splits, N), device=dev, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_splits)  # noqa: E731
    _fwd_kernel[grid](
        x, w, y, part[0], part[1], part[2], N, V, H, x.stride(0), w.stride(0), n_splits,
        UPCAST=interpreting(), DOT_PRECISION=_dot_precision(x.dtype), **_tile_args(),
    )
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    has_seq = seq_ids is not None
    seq_sums = torch.zeros(max(num_seqs, 1), device=dev, dtype=torch.float32)
    block = 64 if interpreting() else 256
    _combine_kernel[(triton.cdiv(N, block),)](
        part[0], part[1], part[2], y, seq_ids if has_seq else y, lse, logp, seq_sums, N, n_splits, ignore_index,
        HAS_SEQ=has_seq, BLOCK=block, SPLITS_P2=triton.next_power_of_2(n_splits),
    )
    return lse, logp, (seq_sums[:num_seqs] if has_seq else None)


def default_chunk_rows(V: int, elem_bytes: int, budget_bytes: int = 256 << 20) -> int:
    """Rows per backward chunk so that the [C, V] gradient buffer stays within `budget_bytes`."""
    rows = max(256, budget_bytes // max(1, V * elem_bytes))
    return rows // 256 * 256


def backward(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
             need_dw: bool, chunk_rows: int | None = None):
    """dX [N,H] (x.dtype) and dW [V,H] (w.dtype, fp32-accumulated; only when need_dw) for upstream
    gradient `grad` [N] of logp, which must be 0 at ignored rows.

    Per chunk of C rows: the logit-gradient kernel writes G [C,V], then dX_chunk = G·W and (only if
    need_dw) dW += Gᵀ·X_chunk as cuBLAS GEMMs.
    """
    N, H = x.shape
    V = w.shape[0]
    g_dtype = torch.float32 if interpreting() else x.dtype
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(V, torch.finfo(g_dtype).bits // 8)
    chunk_rows = max(1, min(chunk_rows, N))
    G = torch.empty((chunk_rows, V), device=x.device, dtype=g_dtype)
    dx = torch.empty_like(x)
    dw = torch.zeros((V, H), device=x.device, dtype=torch.float32) if need_dw else None
    w_mm = w if w.dtype == g_dtype else w.to(g_dtype)
    for n0 in range(0, N, chunk_rows):
        n1 = min(n0 + chunk_rows, N)
        grid = lambda meta: (triton.cdiv(n1 - n0, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
        _grad_kernel[grid](
            x, w, y, lse, grad, G, n0, n1, V, H, x.stride(0), w.stride(0), G.stride(0),
            UPCAST=interpreting(), DOT_PRECISION=_dot_precision(x.dtype), **_tile_args(),
        )
        g = G[: n1 - n0]
        if dx.dtype == g_dtype:
            torch.mm(g, w_mm, out=dx[n0:n1])
        else:
            dx[n0:n1] = g @ w_mm
        if need_dw:  # fp32 accumulator over chunks; each chunk's GEMM runs in the input dtype
            x_c = x[n0:n1] if x.dtype == g_dtype else x[n0:n1].to(g_dtype)
            if g_dtype == torch.float32:
                dw.addmm_(g.t(), x_c)
            else:
                dw.add_(torch.mm(g.t(), x_c))
    return dx, (dw.to(w.dtype) if need_dw else None)
