"""Fused LM head + label log-probs: public API and dispatch between implementations.

    linear_logprobs(hidden [N,H], weight [V,H], labels [N])        -> logp [N] fp32
    sequence_logprobs(hidden [S,T,H], weight [V,H], labels [S,T])  -> Σ_t logp [S] fp32

Neither materializes [N,V] logits. Implementations (`impl`):
  triton     — the kernels of `clo_kernels` (CUDA, or the Triton interpreter with TRITON_INTERPRET=1);
  torch      — chunked PyTorch with the same contract: O(chunk·V) extra memory (the CPU path);
  reference  — materialized fp32 logits + log_softmax (tests and benchmarks only);
  auto       — CUDA tensors → triton; CPU → torch, or triton when TRITON_INTERPRET=1.
The head weight gets a gradient only when it requires one: a frozen head (attention-only CLO) does no
dW work and allocates no [V,H] buffer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from clo_fast.constants import HEAD_IMPLS as HEAD_IMPL_NAMES
from clo_fast.constants import IGNORE_INDEX

_CPU_CHUNK_BYTES = 32 << 20  # fp32 [chunk, V] logit buffer budget for the torch path
# row cap of a CPU torch-path chunk (the byte budget alone allows 4096 rows at V = 2048): measured on a
# 2-core EPYC (torch 2.13, fp32), forward + backward of the frozen head over 1278 rows at V = 2048, H = 128:
# 256-row chunks 26.6 ms vs 48.5 ms in one chunk (the [chunk, V] logits stay in cache; 64-row chunks: 35 ms)
_CPU_CHUNK_ROWS = 256


# ------------------------------------------------------------------------------ chunked torch path
def _torch_chunk_rows(V: int, chunk_rows: int | None, device_type: str = "cpu") -> int:
    by_bytes = _CPU_CHUNK_BYTES // (4 * V)
    return chunk_rows or max(16, min(_CPU_CHUNK_ROWS, by_bytes) if device_type == "cpu" else by_bytes)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _torch_forward(x, w, y, ignore_index, seq_ids=None, num_seqs=0, input_grad=False, chunk_rows=None):
    """lse, logp, per-sequence sums (with seq_ids) and, with input_grad (frozen head), D = dlogp/dx [N,H]
    from the same logits chunk."""
    N = x.shape[0]
    cd = _compute_dtype(x)
    wc = w.to(cd)
    lse = torch.empty(N, device=x.device, dtype=cd)
    logp = torch.empty(N, device=x.device, dtype=cd)
    D = torch.empty(x.shape, device=x.device, dtype=x.dtype) if input_grad else None
    rows = _torch_chunk_rows(w.shape[0], chunk_rows, x.device.type)
    for n0 in range(0, N, rows):
        z = x[n0 : n0 + rows].to(cd) @ wc.T
        yc = y[n0 : n0 + rows]
        valid = yc != ignore_index
        safe = torch.where(valid, yc, 0).unsqueeze(1)
        # log-sum-exp by hand, so that the one exp pass also gives the softmax D needs (torch.logsumexp
        # and a second exp over the chunk cost ~10% of a demo-shape CPU step)
        zmax = z.amax(dim=1, keepdim=True)
        z.sub_(zmax)
        picked = z.gather(1, safe).squeeze(1)  # z_y − max
        total = z.exp_().sum(dim=1, keepdim=True)
        log_total = total.log()
        lse[n0 : n0 + rows] = (zmax + log_total).squeeze(1)
        logp[n0 : n0 + rows] = torch.where(valid, picked - log_total.squeeze(1), 0.0)
        if input_grad:  # dlogp/dz = onehot(y) − softmax(z), 0 on ignored rows; D = that · W
            g = z.div_(total).neg_()
            g.scatter_add_(1, safe, torch.ones_like(total))
            g.mul_(valid[:, None])
            D[n0 : n0 + rows] = g @ wc
        del z
    sums = None
    if seq_ids is not None:
        sums = torch.zeros(num_seqs, device=x.device, dtype=logp.dtype).index_add_(0, seq_ids, logp)
    return lse, logp, sums, D


def _torch_backward(x, w, y, lse, grad, need_dw, ignore_index, chunk_rows=None):
    """dX and (need_dw) dW for upstream gradient `grad` [N] of logp (0 at ignored rows)."""
    N = x.shape[0]
    cd = _compute_dtype(x)
    wc = w.to(cd)
    dx = torch.empty_like(x)
    dw = torch.zeros(w.shape, device=w.device, dtype=cd) if need_dw else None
    rows = _torch_chunk_rows(w.shape[0], chunk_rows, x.device.type)
    for n0 in range(0, N, rows):
        xc = x[n0 : n0 + rows].to(cd)
        z = xc @ wc.T
        # dlogp/dz = onehot(y) − softmax(z); scaled by the upstream gradient (0 at ignored rows)
        g = torch.exp_(z.sub_(lse[n0 : n0 + rows, None].to(cd))).mul_(-grad[n0 : n0 + rows, None].to(cd))
        yc = y[n0 : n0 + rows]
        valid = yc != ignore_index
        g.scatter_add_(1, torch.where(valid, yc, 0).unsqueeze(1), grad[n0 : n0 + rows, None].to(cd))
        dx[n0 : n0 + rows] = g @ wc
        if need_dw:
            dw.addmm_(g.T, xc)
        del z, g
    return dx, (dw.to(w.dtype) if need_dw else None)


# ------------------------------------------------------------------------------------ the backends
def _triton_forward(x, w, y, ignore_index, seq_ids=None, num_seqs=0, input_grad=False, chunk_rows=None):
    import clo_kernels

    return clo_kernels.forward(x, w, y, ignore_index, seq_ids, num_seqs, input_grad=input_grad, chunk_rows=chunk_rows)


def _triton_backward(x, w, y, lse, grad, need_dw, ignore_index, chunk_rows=None):
    import clo_kernels

    del ignore_index  # the kernels need none: grad is already 0 at ignored rows
    return clo_kernels.backward(x, w, y, lse, grad, need_dw)  # chunk_rows shapes the forward only


class Backend(NamedTuple):
    """One implementation of the fused head, behind the same two calls.

    forward(x, w, y, ignore_index, seq_ids, num_seqs, input_grad, chunk_rows) -> (lse, logp, sums | None, D | None)
    backward(x, w, y, lse, grad, need_dw, ignore_index, chunk_rows) -> (dX, dW | None)
    """

    forward: Callable
    backward: Callable


# the fused implementations' kernels (HEAD_IMPLS below is the table users choose from)
BACKENDS = {"triton": Backend(_triton_forward, _triton_backward), "torch": Backend(_torch_forward, _torch_backward)}


class _LinearLogprobs(torch.autograd.Function):
    """logp [N] (or per-sequence sums [S] when seq_ids is given).

    Frozen head (both implementations): dX = g ⊙ D with D = dlogp/dx computed in the forward from the same
    logits (exact, no recompute; see clo_kernels.linear_logprobs). Trainable head: the backward recomputes
    the logits chunk by chunk, since dW needs the upstream gradient g before its GEMM.
    """

    @staticmethod
    def forward(ctx, x, w, y, seq_ids, num_seqs, ignore_index, impl, chunk_rows):
        deferred = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]  # dX wanted, head frozen
        lse, logp, sums, D = BACKENDS[impl].forward(x, w, y, ignore_index, seq_ids, num_seqs, deferred, chunk_rows)
        if D is not None:  # X and W are not needed again: keep D [N,H] in their place
            ctx.save_for_backward(D, y, seq_ids)
        else:
            ctx.save_for_backward(x, w, y, lse, seq_ids)
        ctx.deferred = D is not None
        ctx.ignore_index, ctx.impl, ctx.chunk_rows = ignore_index, impl, chunk_rows
        out = logp if seq_ids is None else sums
        return out if x.dtype == torch.float64 else out.float()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.deferred:
            D, y, seq_ids = ctx.saved_tensors
        else:
            x, w, y, lse, seq_ids = ctx.saved_tensors
        # per-token upstream gradient: the gradient of the token's sequence sum (the CLO coefficient of
        # its sequence, plus the NLL weight for SFT sequences), 0 at ignored rows
        grad = grad_out if seq_ids is None else grad_out[seq_ids]
        acc = torch.float64 if (D if ctx.deferred else x).dtype == torch.float64 else torch.float32
        grad = torch.where(y != ctx.ignore_index, grad, 0.0).to(acc).contiguous()
        if ctx.deferred:
            return (grad[:, None] * D).to(D.dtype), None, None, None, None, None, None, None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = BACKENDS[ctx.impl].backward(x, w, y, lse, grad, need_dw, ctx.ignore_index, ctx.chunk_rows)
        return (dx if need_dx else None), dw, None, None, None, None, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Plain PyTorch: log softmax(logits)[label] per position, 0 where ignored.

    logits [..., V] (materialized), labels [...] aligned with the rows they score. Computes in fp32
    (float64 inputs stay float64).
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp_all = torch.log_softmax(logits.to(compute), dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    return logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask


def _check_inputs(hidden, weight, labels, ignore_index=IGNORE_INDEX):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N,H] and weight [V,H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = {hidden.shape[0]}, got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError("hidden, weight and labels must be on the same device")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight has 0 rows: the vocabulary is empty (V = 0)")
    if labels.device.type == "cpu":  # host tensors only: a device check would synchronize the step
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {V}) (and is not ignore_index "
                f"{ignore_index}); {int(bad.sum())} such labels"
            )


def _check_chunk_rows(chunk_rows) -> None:
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")


# ----------------------------------------------------------------------------- the implementations
def _fused(backend: str) -> Callable:
    """The fused head through `backend`'s kernels: (x, w, y, seq_ids, num_seqs, ignore_index, chunk_rows) -> logp [N]
    (seq_ids None) or per-sequence sums [num_seqs]."""

    def run(x, w, y, seq_ids, num_seqs, ignore_index, chunk_rows):
        ids = None if seq_ids is None else seq_ids.contiguous()
        return _LinearLogprobs.apply(
            x.contiguous(), w.contiguous(), y.contiguous(), ids, num_seqs, ignore_index, backend, chunk_rows
        )

    return run


def _reference(x, w, y, seq_ids, num_seqs, ignore_index, chunk_rows):
    """Materialized logits + log_softmax, in fp32 (float64 for float64 inputs): tests and benchmarks only."""
    del chunk_rows
    cd = _compute_dtype(x)
    lp = token_logps(x.to(cd) @ w.to(cd).T, y, ignore_index)
    return lp if seq_ids is None else torch.zeros(num_seqs, device=x.device, dtype=lp.dtype).index_add_(0, seq_ids, lp)


class HeadImpl(NamedTuple):
    run: Callable
    needs_triton: bool  # CUDA tensors, or the Triton interpreter (TRITON_INTERPRET=1)


# The one table of head implementations (`impl`; train.head_impl): its names are constants.HEAD_IMPLS
HEAD_IMPLS = {
    "triton": HeadImpl(_fused("triton"), needs_triton=True),
    "torch": HeadImpl(_fused("torch"), needs_triton=False),
    "reference": HeadImpl(_reference, needs_triton=False),
}
assert tuple(HEAD_IMPLS) == HEAD_IMPL_NAMES


def _resolve(impl: str, x: torch.Tensor) -> HeadImpl:
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "auto":
        return HEAD_IMPLS["triton" if x.is_cuda or interpreting else "torch"]
    if impl not in HEAD_IMPLS:
        raise ValueError(f"impl must be {'|'.join(('auto', *HEAD_IMPLS))}, got {impl!r}")
    if HEAD_IMPLS[impl].needs_triton and not x.is_cuda and not interpreting:
        raise ValueError(
            f'impl="{impl}" needs CUDA tensors (got {x.device.type}) or TRITON_INTERPRET=1 (the interpreter); '
            'use impl="auto" or "torch" on CPU'
        )
    return HEAD_IMPLS[impl]


# ------------------------------------------------------------------------------------- public API
def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """log p(labels[i]) under softmax(hidden @ weightᵀ) [N] float32 (float64 for float64 inputs); 0 where ignored.

    Differentiable w.r.t. hidden, and weight when it requires grad. Never materializes [N,V]
    (except impl="reference"). Labels are aligned with the rows they score: no shift is done here.
    """
    _check_inputs(hidden, weight, labels, ignore_index)
    _check_chunk_rows(chunk_rows)
    return _resolve(impl, hidden).run(hidden, weight, labels, None, 0, ignore_index, chunk_rows)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-sequence Σ_t log p(labels[s,t]) [S] from hidden [S,T,H]: the paired-sequence gathering, fused.

    Rows 4b+k of a CLO batch give `logps.view(B, 4)` for `clo_fast.loss.clo_loss`.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [S,T,H] and labels [S,T]; got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    S, T, H = hidden.shape
    x, y = hidden.reshape(S * T, H), labels.reshape(S * T)
    _check_inputs(x, weight, y, ignore_index)
    _check_chunk_rows(chunk_rows)
    seq_ids = torch.arange(S, device=hidden.device).repeat_interleave(T)
    return _resolve(impl, hidden).run(x, weight, y, seq_ids, S, ignore_index, chunk_rows)


def packed_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-sequence Σ log p [num_seqs] from rows of any sequences: hidden [N,H], labels [N], seq_ids [N] (the
    sequence each row belongs to). With only the labelled rows gathered (indices built on the host where the
    batch is made), the head does no work for prompt and padding rows; the sums are those of
    `sequence_logprobs` on the padded batch."""
    _check_inputs(hidden, weight, labels, ignore_index)
    _check_chunk_rows(chunk_rows)
    if seq_ids.shape != labels.shape:
        raise ValueError(f"seq_ids must be [N] = {labels.shape[0]}, got {tuple(seq_ids.shape)}")
    return _resolve(impl, hidden).run(hidden, weight, labels, seq_ids, num_seqs, ignore_index, chunk_rows)
