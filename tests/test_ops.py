"""linear_logprobs / sequence_logprobs: every implementation against a float64 reference.

On CPU the `triton` implementation runs the real kernels in Triton's interpreter (see conftest.py);
`torch` is the chunked fallback. GPU-marked tests repeat the grid on CUDA with compiled kernels.
"""

import contextlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clo_fast.loss import clo_loss, reference_clo_loss
from clo_fast.ops import linear_logprobs, sequence_logprobs
from clo_kernels.launch import _ALL_GPU_SHAPES as GPU_TILE_SHAPES

IMPLS = ["torch", "triton"]
# the triton impl runs compiled on a GPU machine, interpreted on CPU (conftest.py); torch stays on CPU
DEVICE = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, H, V): a single token, N not a multiple of the block, V prime-ish / odd, H = 48
SHAPES = [(1, 48, 17), (37, 48, 101), (67, 48, 257)]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol(dtype, what):
    if dtype == torch.float32:
        # CPU float32 lands near 1e-7; cuBLAS fp32 reductions over V = 32000 were seen at 2.2e-5 (H100)
        return 1e-5 if what == "fwd" or not torch.cuda.is_available() else 5e-5
    # low-precision inputs: the forward accumulates in fp32 from the same rounded inputs; gradients are
    # rounded to the input dtype (and G to it on GPU)
    return 1e-5 if what == "fwd" else 1e-2


def make(N, H, V, dtype, device, seed, ignore_frac=0.2, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(dtype).to(device)
    w = (torch.randn(V, H, generator=g) * (3.0 / H**0.5)).to(dtype).to(device)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = -100
    if N > 1 and (y == -100).all():
        y[0] = 1
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    return x.requires_grad_(True), w.requires_grad_(w_grad), y.to(device), upstream.to(device)


def reference(x, w, y, upstream):
    """float64 log-softmax of the (already rounded) inputs; grads of Σ upstream·logp."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    lp = torch.log_softmax(x64 @ w64.T, -1)
    valid = y != -100
    out = torch.where(valid, lp.gather(1, torch.where(valid, y, 0)[:, None])[:, 0], 0.0)
    dx, dw = torch.autograd.grad((out * upstream).sum(), [x64, w64])
    return out, dx, dw


@pytest.fixture
def pin_logits_gemm():
    """pin_logits_gemm(mode): the rest of the test makes its logits `mode`'s way (launch.use_logits_gemm)."""
    import clo_kernels.launch as launch

    with contextlib.ExitStack() as stack:
        yield lambda mode: stack.enter_context(launch.use_logits_gemm(mode))


def check_linear(impl, dtype, N, H, V, device, seed=0, chunk_rows=None, head_trains=True):
    x, w, y, up = make(N, H, V, dtype, device, seed, w_grad=head_trains)
    out = linear_logprobs(x, w, y, impl=impl, chunk_rows=chunk_rows)
    assert out.dtype == torch.float32 and out.shape == (N,)
    dx, *dw = torch.autograd.grad((out.double() * up).sum(), [x, w] if head_trains else [x])
    ref, rdx, rdw = reference(x, w, y, up)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < tol(dtype, "fwd"), rel(out, ref)
    assert (out[y == -100] == 0).all(), "ignored positions must be exactly 0"
    assert rel(dx, rdx) < tol(dtype, "bwd"), rel(dx, rdx)
    assert dx.dtype == x.dtype
    if head_trains:
        assert rel(dw[0], rdw) < tol(dtype, "bwd"), rel(dw[0], rdw)
        assert dw[0].dtype == w.dtype
    assert (dx[y == -100] == 0).all(), "ignored rows get no gradient"


@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,V", SHAPES)
def test_linear_logprobs_matches_float64(impl, dtype, N, H, V, head):
    check_linear(impl, dtype, N, H, V, DEVICE[impl], seed=N + V, head_trains=head == "trainable")


@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_rows(impl, head):
    """Several row chunks (the frozen head's forward chunks, the trainable head's backward chunks)."""
    check_linear(impl, torch.float32, 53, 48, 131, DEVICE[impl], seed=3, chunk_rows=16, head_trains=head == "trainable")


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_vocab_splits_combine(impl):
    """Forcing several vocab splits (Triton) must not change the result."""
    import clo_kernels

    x, w, y, up = make(40, 48, 300, torch.float32, DEVICE[impl], 11)
    ref, _, _ = reference(x, w, y, up)
    if impl == "triton":
        for splits in (1, 2, 5, 8):  # 8 > 5 vocab tiles: empty splits too
            _, logp, _, _ = clo_kernels.forward(x.detach(), w.detach(), y, -100, n_splits=splits, logits_gemm="triton")
            assert rel(logp, ref) < 1e-5
    else:
        assert rel(linear_logprobs(x, w, y, impl="torch", chunk_rows=7), ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_wide_logit_range(impl):
    """Peaked rows whose running max jumps by tens of nats between vocabulary tiles (the frozen head keeps
    exp(z − running max) per tile and rescales it by the final lse): dX still matches float64."""
    g = torch.Generator().manual_seed(5)
    N, H, V = 40, 48, 300
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (0.3 / H**0.5)
    w[V - 7] = x[:20].mean(0) * 4.0  # a late vocabulary entry with a logit tens of nats above the rest
    y = torch.randint(0, V, (N,), generator=g)
    y[:10] = V - 7
    x, w = x.float().to(DEVICE[impl]).requires_grad_(True), w.float().to(DEVICE[impl])
    y = y.to(DEVICE[impl])
    up = torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE[impl])
    out = linear_logprobs(x, w, y, impl=impl, chunk_rows=16)
    (dx,) = torch.autograd.grad((out.double() * up).sum(), [x])
    ref, rdx, _ = reference(x, w, y, up)
    z = x.detach().double() @ w.double().T
    assert (z.max(1).values - z[:, :64].max(1).values).max() > 20  # the max does jump across tiles
    assert rel(out, ref) < 1e-5 and rel(dx, rdx) < 1e-5, (rel(out, ref), rel(dx, rdx))


def test_vocab_split_grid_fills_whole_waves():
    """The split count gives at least two programs per SM and never a worse last wave than the least count."""
    import clo_kernels.launch as launch

    for N in (1, 100, 1000, 4096, 8192, 20000):
        s = launch._vocab_splits(N, 128256, torch.device("cpu"))
        rb = -(-N // launch._ROW_BLOCK)
        least = max(1, min(64, -(-2 * launch._num_sms(torch.device("cpu")) // rb)))
        assert least <= s <= 64 and rb * s >= min(2 * launch._num_sms(torch.device("cpu")), rb * 64)


def _clo_batch(B, T, H, V, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4 * B, T, H, generator=g).to(dtype).to(device).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * (3.0 / H**0.5)).to(dtype).to(device)
    labels = torch.randint(0, V, (4 * B, T), generator=g)
    labels[:, : T // 3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    ref = (-torch.rand(B, 4, generator=g, dtype=torch.float64) * 5 - T * 2).to(device)
    return hidden, w, labels.to(device), ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_logprobs_and_clo_loss_match_reference(impl, dtype):
    B, T, H, V = 2, 9, 48, 97
    hidden, w, labels, ref = _clo_batch(B, T, H, V, dtype, DEVICE[impl], 7)
    w.requires_grad_(True)
    logps = sequence_logprobs(hidden, w, labels, impl=impl)
    n = (labels != -100).sum(1).view(B, 4)
    loss, m = clo_loss(logps.view(B, 4), ref.float(), n, 0.1, 0.5)
    dh, dw = torch.autograd.grad(loss, [hidden, w])

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    loss_r, m_r = reference_clo_loss(h64 @ w64.T, labels, ref, 0.1, 0.5)
    rdh, rdw = torch.autograd.grad(loss_r, [h64, w64])
    assert abs(loss.item() - loss_r.item()) / abs(loss_r.item()) < tol(dtype, "fwd") * 10
    for k in ("nll", "cl_loss", "rewards/margins", "logps/chosen"):
        assert m[k].item() == pytest.approx(m_r[k].item(), rel=1e-4, abs=1e-5)
    assert rel(dh, rdh) < tol(dtype, "bwd")
    assert rel(dw, rdw) < tol(dtype, "bwd")


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_sequence_and_single_token(impl):
    hidden, w, labels, _ = _clo_batch(1, 5, 48, 61, torch.float32, DEVICE[impl], 9)
    labels[2] = -100  # one sequence with no scored tokens
    labels[3] = -100
    labels[3, 4] = 7  # one with a single token
    logps = sequence_logprobs(hidden, w, labels, impl=impl)
    assert logps[2].item() == 0.0
    lp = torch.log_softmax(hidden[3, 4].double() @ w.double().T, -1)[7]
    assert logps[3].item() == pytest.approx(lp.item(), rel=1e-5)
    (dh,) = torch.autograd.grad(logps.sum(), [hidden])
    assert (dh[2] == 0).all() and (dh[3, :4] == 0).all() and dh[3, 4].abs().sum() > 0


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any("triton/runtime/interpreter" in f.filename for f in traceback.extract_stack()):
            return out  # the CPU interpreter's host copies of kernel arguments: not ours, absent on GPU
        flat_in = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        in_storage = {a.untyped_storage().data_ptr() for a in flat_in}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # outputs sharing an input's storage (views) allocate nothing
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in in_storage:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_allocates_no_weight_gradient(impl):
    V, H, N = 89, 64, 20  # N < H, so a [N, V] chunk buffer is smaller than [V, H]
    x, w, y, up = make(N, H, V, torch.float32, DEVICE[impl], 4, w_grad=False)
    rec = _ShapeRecorder()
    with rec:
        out = linear_logprobs(x, w, y, impl=impl)
        (out * up.float()).sum().backward()
    assert w.grad is None
    big = [(f, s) for f, s in rec.shapes if s == (V, H) or (len(s) == 2 and s[0] * s[1] >= V * H)]
    assert not big, f"a [V,H]-sized tensor was allocated: {big}"
    # and the trainable head does allocate it (the recorder can see it)
    x, w, y, up = make(N, H, V, torch.float32, DEVICE[impl], 4, w_grad=True)
    rec = _ShapeRecorder()
    with rec:
        (linear_logprobs(x, w, y, impl=impl) * up.float()).sum().backward()
    assert any(s == (V, H) for _, s in rec.shapes)


@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_gradcheck_float64_torch_path(head):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=head == "trainable")
    y = torch.tensor([1, -100, 3, 10, 0, 5, -100])
    inputs = (x, w) if head == "trainable" else (x,)
    f = (
        (lambda a, b: linear_logprobs(a, b, y, impl="torch", chunk_rows=3))
        if head == "trainable"
        else (lambda a: linear_logprobs(a, w, y, impl="torch", chunk_rows=3))
    )
    assert torch.autograd.gradcheck(f, inputs)


def test_bad_inputs():
    x = torch.randn(4, 8)
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match="labels must be int64"):
        linear_logprobs(x, w, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        linear_logprobs(x, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(x, torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="same dtype"):
        linear_logprobs(x, w.double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="impl"):
        linear_logprobs(x, w, torch.zeros(4, dtype=torch.long), impl="magic")
    with pytest.raises(ValueError, match=r"\[S,T,H\]"):
        sequence_logprobs(x, w, torch.zeros(4, dtype=torch.long))


def test_torch_path_memory_is_chunked():
    """The fallback's largest temporary is [chunk, V], never [N, V]."""
    N, H, V = 600, 8, 40000  # default chunk: 32 MiB / (4·V) = 209 rows
    x, w, y, up = make(N, H, V, torch.float32, "cpu", 5, w_grad=False)
    rec = _ShapeRecorder()
    with rec:
        (linear_logprobs(x, w, y, impl="torch") * up.float()).sum().backward()
    biggest = max(s[0] * s[1] for _, s in rec.shapes if len(s) == 2)
    assert biggest < N * V / 2, biggest


# ------------------------------------------------------------------------------ compiled, on CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,V", [(1000, 256, 32000), (777, 64, 151936), (300, 64, 50257)])
def test_gpu_triton_matches_float64(dtype, N, H, V, head):
    check_linear("triton", dtype, N, H, V, "cuda", seed=N, head_trains=head == "trainable")


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(GPU_TILE_SHAPES)))
def test_gpu_every_autotune_config(config, monkeypatch, pin_logits_gemm):
    """Each tile shape the autotuner may pick computes the same function (not only the one it picks)."""
    import triton

    import clo_kernels.launch as launch
    from clo_kernels.linear_logprobs import _logit_grad_kernel, _partial_lse_kernel

    if GPU_TILE_SHAPES[config][5] and not launch.tma_available():
        pytest.skip("a TMA tile: needs Triton tensor descriptors and a Hopper or newer GPU")
    cfg = launch._cfg(*GPU_TILE_SHAPES[config])
    fixed = {
        "fwd": (triton.autotune([cfg], key=[])(_partial_lse_kernel),) * 2,
        "grad": (triton.autotune([cfg], key=[])(_logit_grad_kernel),) * 2,
    }
    monkeypatch.setattr(launch, "_kernels", fixed)
    pin_logits_gemm("triton")  # the tiles matter for the streaming forward
    for head_trains in (False, True):
        check_linear("triton", torch.bfloat16, 777, 512, 151936, "cuda", seed=config, head_trains=head_trains)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N·V > 2³¹: offsets into the logit-gradient buffer and partials must not overflow."""
    N, H, V = 17000, 32, 128256
    check_linear("triton", torch.bfloat16, N, H, V, "cuda", seed=1, head_trains=False)
    check_linear("triton", torch.bfloat16, N, H, V, "cuda", seed=2, head_trains=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_sequence_logprobs_clo(dtype):
    B, T, H, V = 2, 257, 128, 32000
    hidden, w, labels, ref = _clo_batch(B, T, H, V, dtype, "cuda", 3)
    logps = sequence_logprobs(hidden, w, labels)
    n = (labels != -100).sum(1).view(B, 4)
    loss, _ = clo_loss(logps.view(B, 4), ref.float(), n, 0.1, 0.5, validate=False)
    (dh,) = torch.autograd.grad(loss, [hidden])
    h64 = hidden.detach().double().requires_grad_(True)
    loss_r, _ = reference_clo_loss(h64 @ w.double().T, labels, ref, 0.1, 0.5)
    (rdh,) = torch.autograd.grad(loss_r, [h64])
    assert abs(loss.item() - loss_r.item()) / abs(loss_r.item()) < 1e-4
    assert rel(dh, rdh) < tol(dtype, "bwd")


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_packed_labelled_rows_equal_padded_sums(impl):
    """Only the labelled rows through the head (gathered by host-built indices) give the padded batch's sums,
    and the same gradient on those rows (0 elsewhere)."""
    from clo_fast.ops import packed_sequence_logprobs

    dev = DEVICE.get(impl, "cpu")
    hidden, w, labels, _ = _clo_batch(2, 29, 48, 131, torch.float32, dev, 7)
    S, T, H = hidden.shape
    padded = sequence_logprobs(hidden, w, labels, impl=impl)
    (dpad,) = torch.autograd.grad(padded.sum() * 1.0 + (padded * torch.arange(S, device=dev)).sum(), [hidden])
    rows = (labels.reshape(-1) != -100).nonzero()[:, 0]  # on the host in the trainer; here a test fixture
    seq = rows // T
    x = hidden.reshape(S * T, H).index_select(0, rows)
    packed = packed_sequence_logprobs(x, w, labels.reshape(-1)[rows], seq, S, impl=impl)
    (dpk,) = torch.autograd.grad(packed.sum() + (packed * torch.arange(S, device=dev)).sum(), [hidden])
    assert rows.numel() < S * T
    assert rel(packed, padded) < 1e-6, rel(packed, padded)
    assert rel(dpk, dpad) < 1e-6


def test_compiled_launchers_build_without_the_interpreter():
    """The GPU launch set-up (autotuners and their keys) is built at import when TRITON_INTERPRET is unset, as in
    a DeepSpeed child process: a key naming a non-argument fails there, not only on a GPU."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", "import clo_kernels.launch as l; assert not l.interpreting()"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("need_dw", [False, True])
def test_trainable_backward_vocab_slices(need_dw):
    """The trainable head's backward in several vocabulary slices (a last, narrower one too) equals float64."""
    import clo_kernels

    dev = DEVICE["triton"]
    x, w, y, up = make(45, 48, 300, torch.float32, dev, 13)
    ref, rdx, rdw = reference(x, w, y, up)
    lse, _, _, _ = clo_kernels.forward(x.detach(), w.detach(), y, -100)
    grad = torch.where(y != -100, up.float(), 0.0).contiguous()
    for cols in (64, 128, 300):  # 300 → one slice; 64 → five slices, the last 44 wide
        dx, dw = clo_kernels.backward(x.detach(), w.detach(), y, lse, grad, need_dw, chunk_cols=cols)
        assert rel(dx, rdx) < 1e-5, (cols, rel(dx, rdx))
        if need_dw:
            assert rel(dw, rdw) < 1e-5, (cols, rel(dw, rdw))
        else:
            assert dw is None


@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_tma_operand_loads_match_float64(head, monkeypatch, pin_logits_gemm):
    """The TMA tensor-descriptor loads (a Hopper tile-space option) compute the same function: run in the
    interpreter on CPU, compiled in the GPU tests' every-config sweep."""
    import clo_kernels.launch as launch

    if torch.cuda.is_available():
        pytest.skip("covered compiled by test_gpu_every_autotune_config")
    monkeypatch.setitem(launch._INTERPRETER_TILE, "USE_TMA", True)
    pin_logits_gemm("triton")
    check_linear("triton", torch.float32, 53, 48, 131, "cpu", seed=4, chunk_rows=16, head_trains=head == "trainable")
    check_linear("triton", torch.float32, 37, 64, 300, "cpu", seed=5, head_trains=head == "trainable")


@pytest.mark.parametrize("logits_gemm", ["cublas", "triton"])
@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_both_logit_gemm_paths_match_float64(logits_gemm, head, monkeypatch, pin_logits_gemm):
    """The forward's two ways to make the logits (fp32-output GEMM + rows kernel, or the streaming Triton GEMM)
    give the same log-probs, sequence sums and gradients, with several row chunks."""

    pin_logits_gemm(logits_gemm)
    dev = DEVICE["triton"]
    for dtype in [torch.float32] + ([torch.bfloat16] if dev == "cuda" else []):
        check_linear("triton", dtype, 53, 48, 131, dev, seed=8, chunk_rows=16, head_trains=head == "trainable")
        check_linear("triton", dtype, 37, 64, 300, dev, seed=9, head_trains=head == "trainable")
    hidden, w, labels, _ = _clo_batch(2, 23, 48, 131, torch.float32, dev, 10)
    got = sequence_logprobs(hidden, w, labels, impl="triton")
    want = sequence_logprobs(hidden.double(), w.double(), labels, impl="reference")
    assert rel(got, want) < 1e-5


def test_cublas_logits_path_needs_an_fp32_output_gemm():
    """Forcing the cuBLAS path where torch has no fp32-output GEMM for the dtype is a clear error; auto falls back."""
    import clo_kernels.launch as launch

    if torch.cuda.is_available():
        pytest.skip("CUDA has the fp32-output GEMM")
    x = torch.randn(5, 16).bfloat16()
    w = torch.randn(40, 16).bfloat16()
    y = torch.randint(0, 40, (5,))
    with pytest.raises(RuntimeError, match="out_dtype"):
        launch.forward(x, w, y, -100, logits_gemm="cublas")
    lse, logp, _, _ = launch.forward(x, w, y, -100, logits_gemm="auto")  # streaming fallback
    ref = torch.log_softmax(x.double() @ w.double().T, -1).gather(1, y[:, None])[:, 0]
    assert rel(logp, ref) < 1e-5


def test_cublas_rows_kernel_writes_g_apart_from_the_logits(monkeypatch, pin_logits_gemm):
    """The cuBLAS path's rows kernel gets a G buffer that shares no byte with the fp32 logits it reads (its warps
    are not ordered: a G over the start of Z's row raced on a GPU, which the interpreter cannot show), and the
    frozen head's log-probs, sums and gradients still equal float64 over several chunks."""
    import clo_kernels.launch as launch

    real = launch._rows_lse_grad_kernel
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch_(z, *args, **kwargs):
                g = args[5]
                z_bytes = (z.data_ptr(), z.data_ptr() + z.untyped_storage().nbytes())
                g_bytes = (g.data_ptr(), g.data_ptr() + g.shape[0] * g.stride(0) * g.element_size())
                seen.append((kwargs["STORE_G"], z_bytes[1] <= g_bytes[0] or g_bytes[1] <= z_bytes[0]))
                return real[grid](z, *args, **kwargs)

            return launch_

    monkeypatch.setattr(launch, "_rows_lse_grad_kernel", Recorder())
    pin_logits_gemm("cublas")
    dev = DEVICE["triton"]
    for dtype in [torch.float32] + ([torch.bfloat16] if dev == "cuda" else []):
        check_linear("triton", dtype, 53, 48, 131, dev, seed=21, chunk_rows=16, head_trains=False)
    frozen = [apart for store_g, apart in seen if store_g]
    assert len(frozen) >= 4 and all(frozen), seen


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 788.00 MiB (simulated)")


def test_cublas_logits_out_of_memory_falls_back_in_auto_and_says_so(monkeypatch):
    """Out of memory in the cuBLAS path: 'auto' warns (naming the reason and the chunk) and returns the streaming
    path's exact result; later calls with chunks as large skip the cuBLAS attempt without another warning."""
    import warnings

    import clo_kernels.launch as launch

    calls = []
    monkeypatch.setattr(launch, "_CUBLAS_OOM_BYTES", {})
    monkeypatch.setattr(launch, "_logits_fp32", lambda *a: (calls.append(1), _oom())[1])
    x, w, y, _ = make(40, 32, 150, torch.float32, "cpu", 31)
    ref = torch.log_softmax(x.detach().double() @ w.detach().double().T, -1)
    ref = torch.where(y != -100, ref.gather(1, y.clamp_min(0)[:, None])[:, 0], 0.0)
    with pytest.warns(RuntimeWarning, match=r"auto.*out of device memory.*chunks of 16 rows.*falling back"):
        _, logp, _, D = launch.forward(
            x.detach(), w.detach(), y, -100, input_grad=True, chunk_rows=16, logits_gemm="auto"
        )
    assert len(calls) == 1 and D is not None
    assert rel(logp, ref) < 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, again, _, _ = launch.forward(
            x.detach(), w.detach(), y, -100, input_grad=True, chunk_rows=16, logits_gemm="auto"
        )
    assert not [m for m in caught if "logits_gemm" in str(m.message)], "warned once, not every call"
    assert len(calls) == 1, "a chunk size that ran out of memory is not tried again"
    assert torch.equal(again, logp)
    with pytest.warns(RuntimeWarning, match="chunks of 8 rows"):  # a smaller chunk is tried again
        launch.forward(x.detach(), w.detach(), y, -100, input_grad=True, chunk_rows=8, logits_gemm="auto")
    assert len(calls) == 2


def test_cublas_logits_out_of_memory_is_reported_as_such(monkeypatch):
    """logits_gemm='cublas' raises torch.OutOfMemoryError naming the chunk (not "needs an fp32-output GEMM"), and
    the fp32-output GEMM helper lets an out-of-memory error through instead of reading it as "unsupported"."""
    import clo_kernels.launch as launch

    monkeypatch.setattr(launch, "_CUBLAS_OOM_BYTES", {})
    x, w, y, _ = make(40, 32, 150, torch.float32, "cpu", 32)
    monkeypatch.setattr(launch, "_logits_fp32", _oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"logits_gemm='cublas'.*chunks of 16 rows × V 150") as err:
        launch.forward(x.detach(), w.detach(), y, -100, input_grad=True, chunk_rows=16, logits_gemm="cublas")
    assert "out_dtype" not in str(err.value)
    monkeypatch.undo()
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: _oom() if "out_dtype" in k else real_mm(*a, **k))
    with pytest.raises(torch.OutOfMemoryError):
        launch._logits_fp32(x.detach().bfloat16(), w.detach().bfloat16())


def test_cublas_chunk_rows_memory_rule(monkeypatch):
    """The cuBLAS path's chunk: 1024 rows where C·V·(4 + g_bytes) fits the budget and half the free device
    memory, fewer (multiples of 128, at least 128) where it does not."""
    import clo_kernels.launch as launch

    cpu = torch.device("cpu")
    for V in (32000, 128256, 151936):  # Mistral, Llama-3, Qwen-2.5 vocabularies, bf16 G
        assert launch.cublas_chunk_rows(V, 2, cpu) == 1024
    big = launch.cublas_chunk_rows(256000, 2, cpu)  # Gemma-sized: 1024 rows would pass the budget
    assert big % 128 == 0 and big * 256000 * 6 <= launch.CUBLAS_CHUNK_BUDGET_BYTES < (big + 128) * 256000 * 6
    free = 600 << 20
    monkeypatch.setattr(launch, "_free_device_bytes", lambda device: free)
    rows = launch.cublas_chunk_rows(128256, 2, cpu)
    assert rows % 128 == 0 and rows * 128256 * 6 <= free // 2 < (rows + 128) * 128256 * 6
    monkeypatch.setattr(launch, "_free_device_bytes", lambda device: 1 << 20)
    assert launch.cublas_chunk_rows(128256, 2, cpu) == 128  # the floor: an OOM then says so


def _head(V=11, N=6, H=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("bad_label", [11, 12, -5])
def test_labels_outside_the_vocabulary_are_errors(impl, bad_label):
    from clo_fast.ops import linear_logprobs, sequence_logprobs

    x, w = _head()
    y = torch.tensor([0, 3, bad_label, -100, 10, 1])
    with pytest.raises(ValueError, match=rf"labels\[2\] = {bad_label} is outside the vocabulary \[0, 11\)"):
        linear_logprobs(x, w, y, impl=impl)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sequence_logprobs(x.view(2, 3, 8), w, y.view(2, 3), impl=impl)
    y[2] = 10  # the largest valid id, and ignore_index, pass
    assert torch.isfinite(linear_logprobs(x, w, y, impl=impl)).all()


@pytest.mark.parametrize("chunk_rows", [0, -1, 2.5])
def test_invalid_chunk_rows_are_errors(chunk_rows):
    from clo_fast.ops import linear_logprobs

    x, w = _head()
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        linear_logprobs(x, w, torch.zeros(6, dtype=torch.long), impl="torch", chunk_rows=chunk_rows)


def test_triton_without_cuda_or_interpreter_says_so(monkeypatch):
    from clo_fast.ops import linear_logprobs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = _head()
    with pytest.raises(ValueError, match="needs CUDA tensors .* or TRITON_INTERPRET=1"):
        linear_logprobs(x, w, torch.zeros(6, dtype=torch.long), impl="triton")


def test_empty_vocabulary_is_an_error():
    from clo_fast.ops import linear_logprobs

    x, w = _head(V=0)
    with pytest.raises(ValueError, match="V = 0"):
        linear_logprobs(x, w, torch.full((6,), -100), impl="torch")
