"""clo_loss and reference_clo_loss against hand-computed values, limits, gradcheck and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from clo_fast.loss import clo_loss, gather_sequence_logps, reference_clo_loss


def _rand_inputs(B, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pol = -torch.rand(B, 4, generator=g, dtype=dtype) * 20 - 1
    ref = -torch.rand(B, 4, generator=g, dtype=dtype) * 20 - 1
    n = torch.randint(1, 30, (B, 4), generator=g)
    return pol, ref, n


def test_hand_computed_single_example():
    pol = torch.tensor([[-10.0, -14.0, -12.0, -9.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -13.0, -12.5, -10.0]], dtype=torch.float64)
    n = torch.tensor([[5, 6, 4, 7]])
    beta, lam = 0.1, 0.5
    loss, m = clo_loss(pol, ref, n, beta, lam)
    d_en = 0.1 * ((-10 + 11) - (-14 + 13))  # 0.2
    d_tgt = 0.1 * ((-12 + 12.5) - (-9 + 10))  # -0.05

    def sp(d):
        return math.log1p(math.exp(-d))  # -log σ(d)

    cl = (sp(d_en) + sp(d_tgt)) / 2
    nll = 12.0 / 4
    assert loss.item() == pytest.approx(0.5 * nll + 0.5 * cl, rel=1e-12)
    assert m["nll"].item() == pytest.approx(3.0)
    assert m["cl_loss"].item() == pytest.approx(cl, rel=1e-12)
    assert m["en/rewards/margins"].item() == pytest.approx(0.2)
    assert m["tgt/rewards/margins"].item() == pytest.approx(-0.05)
    assert m["en/rewards/accuracies"].item() == 1.0 and m["tgt/rewards/accuracies"].item() == 0.0
    assert m["rewards/accuracies"].item() == 0.5
    assert m["en/rewards/chosen"].item() == pytest.approx(0.1)  # β·(−10 + 11)
    assert m["tgt/rewards/rejected"].item() == pytest.approx(0.1)  # β·(−9 + 10)
    assert m["logps/chosen"].item() == pytest.approx(-11.0)  # mean of −10, −12
    assert m["logps/rejected"].item() == pytest.approx(-11.5)  # mean of −14, −9


def test_lambda_limits():
    pol, ref, n = _rand_inputs(5, 1)
    loss1, _ = clo_loss(pol, ref, n, 0.3, 1.0)
    assert loss1.item() == pytest.approx((-pol[:, 2].sum() / n[:, 2].sum()).item(), rel=1e-12)
    loss0, _ = clo_loss(pol, ref, n, 0.3, 0.0)
    r = 0.3 * (pol - ref)
    dpo = torch.cat([-F.logsigmoid(r[:, 0] - r[:, 1]), -F.logsigmoid(r[:, 2] - r[:, 3])]).mean()
    assert loss0.item() == pytest.approx(dpo.item(), rel=1e-12)


def test_swap_chosen_rejected_flips_margins():
    pol, ref, n = _rand_inputs(4, 2)
    _, m = clo_loss(pol, ref, n, 0.2, 0.5)
    perm = [1, 0, 3, 2]
    _, ms = clo_loss(pol[:, perm], ref[:, perm], n[:, perm], 0.2, 0.5)
    for d in ("en/", "tgt/", ""):
        assert ms[f"{d}rewards/margins"].item() == pytest.approx(-m[f"{d}rewards/margins"].item(), rel=1e-12)
        assert ms[f"{d}rewards/chosen"].item() == pytest.approx(m[f"{d}rewards/rejected"].item(), rel=1e-12)


def test_reference_free_equals_zero_reference():
    pol, _, n = _rand_inputs(3, 3)
    a, ma = clo_loss(pol, None, n, 0.1, 0.4)
    b, mb = clo_loss(pol, torch.zeros_like(pol), n, 0.1, 0.4)
    assert a.item() == pytest.approx(b.item(), rel=1e-14)
    assert set(ma) == set(mb)


def test_gradcheck_float64():
    pol, ref, n = _rand_inputs(3, 4)
    pol.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: clo_loss(p, ref, n, 0.5, 0.3)[0], (pol,))
    assert torch.autograd.gradcheck(lambda p: clo_loss(p, None, n, 0.5, 0.7, sft_sequences=(0, 2))[0], (pol,))


def test_reference_clo_loss_matches_clo_loss_on_same_logits():
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 7, 13
    logits = torch.randn(4 * B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (4 * B, T), generator=g)
    labels[:, :2] = -100  # prompt positions
    labels[3, 5:] = -100
    ref = -torch.rand(B, 4, generator=g, dtype=torch.float64) * 10
    loss_r, m_r = reference_clo_loss(logits, labels, ref, 0.1, 0.5)
    # independent gather: explicit loops
    lp = torch.log_softmax(logits, -1)
    pol = torch.zeros(4 * B, dtype=torch.float64)
    cnt = torch.zeros(4 * B, dtype=torch.long)
    for r in range(4 * B):
        for t in range(T):
            if labels[r, t] != -100:
                pol[r] += lp[r, t, labels[r, t]]
                cnt[r] += 1
    loss_c, m_c = clo_loss(pol.view(B, 4), ref, cnt.view(B, 4), 0.1, 0.5)
    assert loss_r.item() == pytest.approx(loss_c.item(), rel=1e-12)
    for k in m_c:
        assert m_r[k].item() == pytest.approx(m_c[k].item(), rel=1e-10, abs=1e-12)
    s, c = gather_sequence_logps(logits, labels)
    assert torch.equal(c, cnt)


def test_global_denominators_make_microbatches_sum_to_full_batch():
    """Gradient accumulation / data parallel: the chosen normalisation reproduces the full-batch loss and grads."""
    pol, ref, n = _rand_inputs(6, 6)
    pol.requires_grad_(True)
    full, _ = clo_loss(pol, ref, n, 0.2, 0.5)
    (g_full,) = torch.autograd.grad(full, pol)
    splits = [slice(0, 1), slice(1, 4), slice(4, 6)]  # uneven micro-batches, uneven token counts
    k = len(splits)
    sft_den = n[:, 2].sum().double() / k
    cl_den = 2 * 6 / k
    parts = [
        clo_loss(pol[s], ref[s], n[s], 0.2, 0.5, sft_denominator=sft_den, cl_denominator=cl_den)[0] for s in splits
    ]
    mean = torch.stack(parts).mean()  # what DeepSpeed's 1/G scaling and rank-averaging compute
    (g_acc,) = torch.autograd.grad(mean, pol)
    assert mean.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(g_acc, g_full, rtol=1e-12, atol=1e-15)
    # and the naive per-micro-batch mean is different (the test can fail)
    naive = torch.stack([clo_loss(pol[s], ref[s], n[s], 0.2, 0.5)[0] for s in splits]).mean()
    assert abs(naive.item() - full.item()) > 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pol": torch.zeros(2, 3)}, r"\[B, 4\]"),
        ({"pol": torch.zeros(0, 4), "n": torch.ones(0, 4, dtype=torch.long), "ref": None}, "B = 0"),
        ({"ref": torch.zeros(3, 4)}, "ref_logps must match"),
        ({"n": torch.ones(2, 3, dtype=torch.long)}, "response_tokens"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"lam": 1.5}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"pol": torch.tensor([[-1.0, float("nan"), -1.0, -1.0], [-1.0] * 4])}, "non-finite.*example 0, sequence 1"),
        (
            {"ref": torch.tensor([[-1.0] * 4, [-1.0, -1.0, float("inf"), -1.0]])},
            "ref_logps has a non-finite.*example 1, sequence 2",
        ),
        ({"n": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]])}, "example 1, sequence 2"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = {
        "pol": -torch.ones(2, 4),
        "ref": -torch.ones(2, 4),
        "n": torch.ones(2, 4, dtype=torch.long),
        "beta": 0.1,
        "lam": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        clo_loss(args["pol"], args["ref"], args["n"], args["beta"], args["lam"])


def test_reference_clo_loss_rejects_row_count_not_multiple_of_four():
    with pytest.raises(ValueError, match="4 sequences"):
        reference_clo_loss(torch.randn(6, 3, 5), torch.zeros(6, 3, dtype=torch.long), None)


def float64_clo_loss(pol, ref, n, beta, lam, *, loss_type="sigmoid", eps=0.0, length_normalize=False):
    """Independent float64 loop over examples and directions, written from the formulas in the issue."""
    pol, ref, n = pol.double().tolist(), ref.double().tolist(), n.double().tolist()
    nll = -sum(p[2] for p in pol) / sum(c[2] for c in n)
    total = 0.0
    for p, r, c in zip(pol, ref, n, strict=True):
        for chosen, rejected in ((0, 1), (2, 3)):
            h = [(p[k] - r[k]) / (c[k] if length_normalize else 1.0) for k in (chosen, rejected)]
            z = beta * (h[0] - h[1])
            if loss_type == "ipo":
                total += (z / beta - 1 / (2 * beta)) ** 2
            else:
                log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
                total += -(1 - eps) * log_sig(z) - eps * log_sig(-z)
    return lam * nll + (1 - lam) * total / (2 * len(pol))


def loss_inputs(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    pol = -40 * torch.rand(b, 4, generator=g) - 2
    ref = pol + 6 * torch.randn(b, 4, generator=g)
    n = torch.randint(1, 30, (b, 4), generator=g)
    return pol, ref, n


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.3, "length_normalize": True},
        {"loss_type": "ipo"},
        {"loss_type": "ipo", "length_normalize": True},
        {"length_normalize": True},
    ],
)
def test_loss_options_match_a_float64_reference(options):
    pol, ref, n = loss_inputs()
    beta, lam = 0.2, 0.3
    got, _ = clo_loss(pol, ref, n, beta, lam, **options)
    want = float64_clo_loss(
        pol,
        ref,
        n,
        beta,
        lam,
        loss_type=options.get("loss_type", "sigmoid"),
        eps=options.get("label_smoothing", 0.0),
        length_normalize=options.get("length_normalize", False),
    )
    assert float(got) == pytest.approx(want, rel=1e-5)
    # gradients too: autograd in float64 through clo_loss vs a central difference of the reference
    pol64 = pol.double().requires_grad_()
    loss64, _ = clo_loss(pol64, ref.double(), n, beta, lam, **options)
    loss64.backward()
    h = 1e-6
    for i, k in ((0, 0), (3, 2), (4, 3)):
        bumped = [pol.double().clone() for _ in range(2)]
        bumped[0][i, k] += h
        bumped[1][i, k] -= h
        kw = {
            "loss_type": options.get("loss_type", "sigmoid"),
            "eps": options.get("label_smoothing", 0.0),
            "length_normalize": options.get("length_normalize", False),
        }
        fd = (
            float64_clo_loss(bumped[0], ref, n, beta, lam, **kw) - float64_clo_loss(bumped[1], ref, n, beta, lam, **kw)
        ) / (2 * h)
        assert float(pol64.grad[i, k]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_default_loss_is_unchanged_and_options_differ():
    pol, ref, n = loss_inputs(1)
    default, _ = clo_loss(pol, ref, n, 0.1, 0.5)
    explicit, _ = clo_loss(pol, ref, n, 0.1, 0.5, loss_type="sigmoid", label_smoothing=0.0, length_normalize=False)
    assert torch.equal(default, explicit)
    for opts in ({"label_smoothing": 0.2}, {"loss_type": "ipo"}, {"length_normalize": True}):
        assert not torch.allclose(clo_loss(pol, ref, n, 0.1, 0.5, **opts)[0], default), opts
