"""Triton kernels for log-probs of labels under softmax(X Wᵀ), without materializing [N, V] logits.

Notation: X [N,H] hidden states, W [V,H] LM-head weight, y [N] labels (ignore_index = skipped),
z = X Wᵀ (never stored whole), lse_i = log Σ_v exp z_iv, logp_i = z_{i,y_i} − lse_i.

Two ways to make the logits (`launch.LOGITS_GEMM`, or `launch.use_logits_gemm`; the benchmark measures both):
  cuBLAS chunks — Z = X_c·Wᵀ by an fp32-output cuBLAS GEMM per chunk of C rows (4·C·V bytes), then
      `_rows_lse_grad_kernel`, one program per row: online max / Σexp and the label's logit over Z (lse,
      logp, the sequence sum by atomics) and, for a frozen head, G = onehot − exp(z − lse) written in the
      input dtype into a [C, V] buffer of its own (not over Z: the kernel's warps would race, see its
      docstring); D_c = G·W by cuBLAS. 4·N·H·V FLOPs, all in cuBLAS; HBM traffic 16 B per logit in bf16
      (write Z 4, read Z 4 + 4, write G 2, read G 2), minus what stays in L2; memory C·V·(4 + 2) bytes.
  Streaming Triton GEMM — the kernels below; no fp32 logit chunk.

Streaming forward (two kernels):
  `_partial_lse_kernel`  grid (⌈N/BN⌉, S): program (n, s) streams the vocab tiles of split s, each tile
      z = X_n W_tileᵀ by `tl.dot` over H in fp32, keeping an online max / Σexp per row and the label's
      logit when it falls in the tile. Writes per-split (max, Σexp, label logit): 3·S·N floats.
      Splitting V over S programs keeps the GPU full when N/BN is small.
  `_combine_kernel`  grid (⌈N/B⌉): merges the S partials into lse [N], logp [N] (0 at ignored rows) and,
      when sequence ids are given, atomically adds logp into per-sequence sums (the paired-sequence
      gathering, fused).
  Cost: 2·N·H·V FLOPs; memory traffic ≈ N·H·(V/BV) re-reads of X tiles (mostly L2) + V·H·⌈N/BN⌉ reads of
  W; extra memory O(S·N).

Frozen head (W needs no gradient), the training default — no recompute, exact:
  logp_t depends on x_t only, and dlogp_t/dx_t = Σ_v (onehot(y_t) − p_t)_v W_v =: D_t does not depend on
  the upstream gradient g_t (the CLO coefficient of the token's sequence, known only after the loss).
  So the forward computes D [N,H] once, per chunk of C rows: `_partial_lse_kernel` with STORE_P writes,
  besides its partials, P̃ = exp(z − m) [C,V] in the input dtype, where m is the row's running max when
  the tile was done (≤ the final max, so P̃ ≤ 1 and nothing overflows), and that m per tile into M
  [C, ⌈V/GRAIN⌉] fp32; `_combine_kernel` gives lse; `_softmax_grad_rows_kernel` turns P̃ in place into
  G = onehot − P̃·exp(M − lse) (= onehot − softmax); D_chunk = G·W is one cuBLAS GEMM. The backward is
  then dX = g ⊙ D: O(N·H). Cost: 4·N·H·V FLOPs in all (no recompute); HBM traffic for the [C,V] buffer
  is 8 bytes per logit in bf16 (write P̃, read P̃, write G, read G), where an fp32 logit round trip
  costs 12; extra memory 2·C·V bytes (bf16; a fixed budget) + D [N,H] kept for the backward in place of X.
  Precision: P̃ is rounded to the input dtype relative to a nearby max (2⁻⁹ relative in bf16), the same
  rounding that G gets anyway.

Trainable head, backward (dW needs the upstream gradient g before its GEMM, so the logits are recomputed),
chunked by VOCABULARY: for each slice [v0, v1) of Vc columns, `_logit_grad_kernel` (grid ⌈N/BN⌉ × ⌈Vc/BV⌉)
recomputes the logit tiles and writes G = g ⊙ (onehot(y) − exp(z − lse)) [N, Vc] in the input dtype;
then dW[v0:v1] = Gᵀ·X is one cuBLAS GEMM written once into its own rows (no [V,H] fp32 accumulator and no
add pass over it), and dX += G·W[v0:v1] accumulates into an fp32 [N,H] buffer (small).
  Cost: 2·N·H·V (recompute) + 2·N·H·V (dX) + 2·N·H·V (dW) FLOPs; extra memory N·Vc elements (a fixed
  budget) + N·H fp32 — never [N,V] and never [V,H] beyond the gradient itself.

Operand loads: plain masked pointer loads, or (USE_TMA, a tile-space option on Hopper) TMA tensor
descriptors made in the kernel, which need a global-memory scratch allocator (`launch.py` sets one).

Accumulation is fp32 throughout; inputs fp32 / bf16 / fp16. Offsets are int64 where N·V or V·H can pass
2³¹. Under TRITON_INTERPRET=1 bf16 is held as uint16, so loads are upcast to fp32 behind UPCAST (set only
when interpreting).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _operand_sources(
    X,
    W,
    N,
    V,
    H,
    stride_xn,
    stride_wv,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """What `_logit_tile` loads from: TMA tensor descriptors of X [N,H] and W [V,H] (Hopper's bulk copy engine
    fetches whole tiles, zero-filling outside the shapes), or the plain pointers."""
    if USE_TMA:
        x_src = tl.make_tensor_descriptor(X, shape=[N, H], strides=[stride_xn, 1], block_shape=[BLOCK_N, BLOCK_H])
        w_src = tl.make_tensor_descriptor(W, shape=[V, H], strides=[stride_wv, 1], block_shape=[BLOCK_V, BLOCK_H])
    else:
        x_src = X
        w_src = W
    return x_src, w_src


@triton.jit
def _logit_tile(
    x_src,
    w_src,
    n0,
    v0,
    offs_n,
    n_mask,
    offs_v,
    v_mask,
    H,
    stride_xn,
    stride_wv,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """z[BN, BV] = X[offs_n, :] · W[offs_v, :]ᵀ, fp32 accumulation (rows/columns outside the masks read 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if USE_TMA:
        for h0 in range(0, H, BLOCK_H):
            x = x_src.load([n0, h0])
            w = w_src.load([v0, h0])
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        x_rows = x_src + offs_n.to(tl.int64)[:, None] * stride_xn
        w_rows = w_src + offs_v.to(tl.int64)[:, None] * stride_wv
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            x = tl.load(x_rows + offs_h[None, :], mask=n_mask[:, None] & h_mask[None, :], other=0.0)
            w = tl.load(w_rows + offs_h[None, :], mask=v_mask[:, None] & h_mask[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _partial_lse_kernel(
    X,
    W,
    Y,
    PART_MAX,
    PART_SUM,
    PART_LABEL,
    P,
    M,
    N,
    V,
    H,
    stride_xn,
    stride_wv,
    stride_pn,
    stride_mn,
    n_splits,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_P: tl.constexpr,
    GRAIN: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    y = tl.load(Y + offs_n, mask=n_mask, other=-1)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_logit = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    # split s owns a contiguous run of vocab tiles; a split past the end stays empty (max −inf, Σexp 0)
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits)
    v_start = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    x_src, w_src = _operand_sources(X, W, N, V, H, stride_xn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_H, USE_TMA)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z = _logit_tile(
            x_src,
            w_src,
            pid_n * BLOCK_N,
            v0,
            offs_n,
            n_mask,
            offs_v,
            v_mask,
            H,
            stride_xn,
            stride_wv,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            UPCAST,
            DOT_PRECISION,
            USE_TMA,
        )
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        e = tl.exp(z - m_new[:, None])
        s = s * tl.exp(m - m_new) + tl.sum(e, axis=1)
        m = m_new
        if STORE_P:  # P̃ = exp(z − m_run) and m_run per GRAIN columns, for the softmax-gradient rows kernel
            rows = offs_n.to(tl.int64)[:, None]
            tl.store(
                P + rows * stride_pn + offs_v[None, :], e.to(P.dtype.element_ty), mask=n_mask[:, None] & v_mask[None, :]
            )
            offs_t = v0 // GRAIN + tl.arange(0, BLOCK_V // GRAIN)
            tl.store(
                M + rows * stride_mn + offs_t[None, :],
                tl.broadcast_to(m_new[:, None], (BLOCK_N, BLOCK_V // GRAIN)),
                mask=n_mask[:, None] & (offs_t[None, :] * GRAIN < v_end),
            )
        hit = offs_v[None, :] == y[:, None]
        label_logit = tl.maximum(label_logit, tl.max(tl.where(hit, z, float("-inf")), axis=1))

    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(PART_MAX + out, m, mask=n_mask)
    tl.store(PART_SUM + out, s, mask=n_mask)
    tl.store(PART_LABEL + out, label_logit, mask=n_mask)


@triton.jit
def _combine_kernel(
    PART_MAX,
    PART_SUM,
    PART_LABEL,
    Y,
    SEQ,
    LSE,
    LOGP,
    SEQ_SUMS,
    N,
    n_splits,
    ignore_index,
    HAS_SEQ: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    splits = tl.arange(0, SPLITS_P2)
    idx = splits.to(tl.int64)[:, None] * N + offs[None, :]
    pmask = (splits[:, None] < n_splits) & mask[None, :]
    pm = tl.load(PART_MAX + idx, mask=pmask, other=float("-inf"))
    ps = tl.load(PART_SUM + idx, mask=pmask, other=0.0)
    pl = tl.load(PART_LABEL + idx, mask=pmask, other=float("-inf"))
    m = tl.where(mask, tl.max(pm, axis=0), 0.0)  # masked lanes: avoid (−inf) − (−inf)
    lse = m + tl.log(tl.sum(ps * tl.exp(pm - m[None, :]), axis=0))
    y = tl.load(Y + offs, mask=mask, other=ignore_index)
    valid = mask & (y != ignore_index)
    logp = tl.where(valid, tl.max(pl, axis=0) - lse, 0.0)
    tl.store(LSE + offs, lse, mask=mask)
    tl.store(LOGP + offs, logp, mask=mask)
    if HAS_SEQ:
        seq = tl.load(SEQ + offs, mask=mask, other=0)
        tl.atomic_add(SEQ_SUMS + seq, logp, mask=valid)


@triton.jit
def _logit_grad_kernel(
    X,
    W,
    Y,
    LSE,
    GRAD,
    G,
    n_start,
    n_end,
    v_start,
    v_end,
    H,
    stride_xn,
    stride_wv,
    stride_gn,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """G[n − n_start, v − v_start] = g_n·(onehot(y_n)_v − exp(z_nv − lse_n)) over rows [n_start, n_end) and
    vocabulary [v_start, v_end): the logit tile is recomputed (2·BN·BV·H FLOPs per tile)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = n_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_end
    offs_v = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < v_end
    # the descriptors' shapes end at n_end / v_end: TMA zero-fills past them, as the masks do
    x_src, w_src = _operand_sources(X, W, n_end, v_end, H, stride_xn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_H, USE_TMA)
    z = _logit_tile(
        x_src,
        w_src,
        n_start + pid_n * BLOCK_N,
        v_start + pid_v * BLOCK_V,
        offs_n,
        n_mask,
        offs_v,
        v_mask,
        H,
        stride_xn,
        stride_wv,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
        UPCAST,
        DOT_PRECISION,
        USE_TMA,
    )
    lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
    g = tl.load(GRAD + offs_n, mask=n_mask, other=0.0)  # 0 at ignored rows (set by the caller)
    y = tl.load(Y + offs_n, mask=n_mask, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
    dz = g[:, None] * (onehot - p)
    rows = (offs_n - n_start).to(tl.int64)
    tl.store(
        G + rows[:, None] * stride_gn + (offs_v - v_start)[None, :],
        dz.to(G.dtype.element_ty),
        mask=n_mask[:, None] & v_mask[None, :],
    )


@triton.jit
def _softmax_grad_rows_kernel(
    P, M, Y, LSE, V, stride_pn, stride_mn, ignore_index, BLOCK: tl.constexpr, GRAIN: tl.constexpr
):
    """In place: P[r, v] ← onehot(y_r)_v − P̃[r, v]·exp(M[r, v // GRAIN] − lse_r)  (d logp_r / d z_r = onehot −
    softmax), 0 on ignored rows. Reads and writes 2·C·V elements of P, C·V/GRAIN of M (cached)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    p_ptr = P + row.to(tl.int64) * stride_pn + offs
    p = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + row.to(tl.int64) * stride_mn + offs // GRAIN, mask=mask, other=0.0)
    lse = tl.load(LSE + row)
    y = tl.load(Y + row)
    g = tl.where(offs == y, 1.0, 0.0) - p * tl.exp(m - lse)
    g = tl.where(y != ignore_index, g, 0.0)
    tl.store(p_ptr, g.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _rows_lse_grad_kernel(
    Z,
    Y,
    SEQ,
    LSE,
    LOGP,
    SEQ_SUMS,
    G,
    V,
    stride_zn,
    stride_gn,
    ignore_index,
    HAS_SEQ: tl.constexpr,
    STORE_G: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row of fp32 logits Z (made by a cuBLAS GEMM): lse, logp, the row's sequence sum and, with STORE_G,
    G = onehot(y) − exp(z − lse) (0 on ignored rows) in G's dtype.

    G must not alias Z's memory. A block's elements are spread over the program's warps, and nothing orders
    one warp's store of G against another warp's load of Z (no barrier between iterations): with a bf16 G
    written over the start of Z's row, g[v] lands on the bytes of z[v/2], which a slower warp may not have
    loaded yet. Triton's interpreter runs a block as one vector, so it cannot show this race.
    Cost per row: one (two with STORE_G) read of 4·V bytes, a write of V·sizeof(G); no FLOP-heavy work.
    """
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_zn
    y = tl.load(Y + row)
    m = tl.max(tl.full((BLOCK,), float("-inf"), dtype=tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK,), dtype=tl.float32), axis=0)
    label = m
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        label = tl.maximum(label, tl.max(tl.where(offs == y, z, float("-inf")), axis=0))
    lse = m + tl.log(s)
    valid = y != ignore_index
    logp = tl.where(valid, label - lse, 0.0)
    tl.store(LSE + row, lse)
    tl.store(LOGP + row, logp)
    if HAS_SEQ:
        tl.atomic_add(SEQ_SUMS + tl.load(SEQ + row), logp, mask=valid)
    if STORE_G:
        g_row = G + row.to(tl.int64) * stride_gn
        for v0 in range(0, V, BLOCK):
            offs = v0 + tl.arange(0, BLOCK)
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=float("-inf"))
            g = tl.where(offs == y, 1.0, 0.0) - tl.exp(z - lse)
            g = tl.where(valid, g, 0.0)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)
