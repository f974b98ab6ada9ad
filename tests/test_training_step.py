"""The training step in-process (no DeepSpeed launch): one optimizer step over several micro-batches gives
the gradient of the CLO loss of the whole batch, computed from materialized logits."""

from __future__ import annotations

import secrets

import pytest
import torch
from helpers import PAD, InProcessEngine, examples, tiny_model

from clo_fast.config import CLOConfig, ConfigError, load_config
from clo_fast.constants import ATTENTION_ONLY_PATTERNS
from clo_fast.data import collate_clo
from clo_fast.loss import clo_loss, reference_clo_loss
from clo_fast.model import apply_trainable_patterns, build_policy
from clo_fast.training.batches import MicroBatcher
from clo_fast.training.step import LanguageMetrics, LossSetup, name_languages, policy_logps, train_step


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", ["collate", "none", "padding_free", "prefix_shared"])
@pytest.mark.parametrize("mode", ["clo", "dpo", "sft"])
def test_accumulated_step_equals_the_whole_batch_gradient(mode, packing):
    """Every packing layout, with the step's examples balanced into 3 micro-batches of unequal example
    counts, gives the gradient of the whole batch's loss from materialized logits."""
    hf = tiny_model()
    policy = build_policy(hf, head_impl="torch")
    apply_trainable_patterns(policy, list(ATTENTION_ONLY_PATTERNS))
    clo = CLOConfig(mode=mode, beta=0.3, lam=0.4, sft_sequences=[0, 2] if mode == "sft" else [2])
    setup = LossSetup.from_config(clo)
    exs = examples(7)
    if packing == "collate":  # the padded dict batches of collate_clo, equal example counts
        exs = exs[:6]
        micro = [collate_clo(exs[i : i + 2], PAD, pad_to_multiple_of=8) for i in range(0, 6, 2)]
    else:
        micro = MicroBatcher(packing, PAD, 8).step_batches(exs, 3, setup.sequences_run)  # one rank: G·W = 3
        assert len({b.num_examples for b in micro}) > 1, "unequal micro-batches exercise the denominators"

    metrics = train_step(InProcessEngine(policy, len(micro)), micro, setup, torch.device("cpu"))
    got = grads(hf)
    hf.zero_grad(set_to_none=True)

    whole = collate_clo(exs, PAD, pad_to_multiple_of=8)
    logits = hf(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
    ref = whole["ref_logps"] if setup.use_reference else None
    loss, ref_metrics = reference_clo_loss(
        logits, whole["labels"], ref, setup.beta, setup.lam, sft_sequences=setup.sft_sequences
    )
    loss.backward()
    want = grads(hf)

    assert got.keys() == want.keys() and got, "the attention projections get gradients"
    assert all("self_attn" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert float(metrics["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    if mode == "sft":
        assert set(metrics) == {"loss", "nll"}  # only the NLL sequences ran
    else:
        assert float(metrics["cl_loss"]) == pytest.approx(float(ref_metrics["cl_loss"]), rel=1e-5)


def test_sft_mode_runs_only_the_nll_sequences():
    policy = build_policy(tiny_model(), head_impl="torch")
    batch = collate_clo(examples(3), PAD, pad_to_multiple_of=8)
    seen = []

    def engine(ids, mask, labels):
        seen.append(ids.shape[0])
        return policy(ids, mask, labels)

    with torch.no_grad():
        full = policy_logps(engine, batch, None)
        part = policy_logps(engine, batch, (0, 2))
    assert seen == [12, 6]
    torch.testing.assert_close(part[:, [0, 2]], full[:, [0, 2]])
    assert (part[:, [1, 3]] == 0).all()


def test_micro_batches_do_not_depend_on_the_rank_layout():
    """The step's global batch is grouped the same way for 1 rank × 4 and 2 ranks × 2 micro-batches."""
    exs = examples(9, seed=4)
    batcher = MicroBatcher("prefix_shared", PAD, 8)
    one = batcher.step_batches(exs, 4, world=1, rank=0)
    two = [batcher.step_batches(exs, 2, world=2, rank=r) for r in range(2)]
    by_slot = [two[r][m] for m in range(2) for r in range(2)]  # micro m of rank r is global slot m·W + r
    assert [b.input_ids.tolist() for b in one] == [b.input_ids.tolist() for b in by_slot]
    assert sum(b.num_examples for b in one) == 9


def test_guard_names_the_first_step_with_a_non_finite_loss():
    from clo_fast.training.step import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cpu"))
    for step, loss in ((1, 0.7), (2, 0.6)):
        guard.observe(step, {"loss": torch.tensor(loss)})
    guard.check(2, grad_norm=1.5)  # all finite: silent
    for step, loss in ((3, float("nan")), (4, float("inf")), (5, 0.5)):
        guard.observe(step, {"loss": torch.tensor(loss)})
    with pytest.raises(NonFiniteError, match="^step 3: the training loss is not finite"):
        guard.check(5, grad_norm=1.0)


@pytest.mark.parametrize("norm", [float("nan"), float("inf"), torch.tensor(float("inf"))])
def test_guard_stops_on_a_non_finite_gradient_norm(norm):
    from clo_fast.training.step import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cpu"))
    guard.observe(7, {"loss": torch.tensor(0.3)})
    with pytest.raises(NonFiniteError, match="^step 7: the gradient norm"):
        guard.check(7, grad_norm=norm)
    guard.check(7, grad_norm=None)  # clipping disabled: DeepSpeed reports no norm


def test_loss_options_reach_the_training_step_and_are_validated():
    setup = LossSetup.from_config(CLOConfig(loss_type="ipo", length_normalize=True))
    assert setup.options == {"loss_type": "ipo", "label_smoothing": 0.0, "length_normalize": True}
    hf = tiny_model()
    policy = build_policy(hf, head_impl="torch")
    batch = collate_clo(examples(2), PAD, pad_to_multiple_of=8)
    with torch.no_grad():
        logps = policy_logps(policy, batch, None)
    got, _ = setup.loss(logps, batch)
    want, _ = clo_loss(
        logps, batch["ref_logps"], batch["response_tokens"], 0.1, 0.5, loss_type="ipo", length_normalize=True
    )
    assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="clo.label_smoothing: applies to loss_type sigmoid only"):
        load_config(None, ["clo.loss_type=ipo", "clo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="clo.loss_type: must be sigmoid|ipo"):
        load_config(None, ["clo.loss_type=hinge"])


# -------------------- Per-language step metrics (clo_fast/training/step.py, data.target_langs): the batches carr
def _setup(length_normalize=False, reference=True):
    return LossSetup(0.1, 0.5, (2,), reference, None, length_normalize=length_normalize)


def _batch(g, n):
    return {
        "languages": torch.randint(0, 3, (n,), generator=g),
        "response_tokens": torch.randint(1, 40, (n, 4), generator=g),
        "ref_logps": -torch.rand(n, 4, generator=g, dtype=torch.float64) * 50,
    }


def test_per_language_metrics_match_a_float64_reference():
    seed = secrets.randbits(31)
    g = torch.Generator().manual_seed(seed)
    for length_normalize in (False, True):
        setup = _setup(length_normalize)
        batches = [_batch(g, int(torch.randint(1, 6, (1,), generator=g))) for _ in range(3)]
        logps = [-torch.rand(b["languages"].shape[0], 4, generator=g, dtype=torch.float64) * 50 for b in batches]
        metrics = LanguageMetrics(batches, setup, [2], n_languages=3)
        for lp, b in zip(logps, batches, strict=True):
            metrics.add(lp.float(), {**b, "ref_logps": b["ref_logps"].float()})
        got = metrics.result()
        lang = torch.cat([b["languages"] for b in batches])
        lp, ref = torch.cat(logps), torch.cat([b["ref_logps"] for b in batches])
        tokens = torch.cat([b["response_tokens"] for b in batches]).double()
        ratio = (lp - ref) / (tokens if length_normalize else 1.0)
        margins = 0.1 * torch.stack([ratio[:, 0] - ratio[:, 1], ratio[:, 2] - ratio[:, 3]], dim=1)
        assert set(got) == {f"{m}/{i}" for i in range(3) for m in ("nll", "rewards/margins", "rewards/accuracies")}
        for i in range(3):
            m = lang == i
            if not m.any():
                assert float(got[f"nll/{i}"]) == 0.0, seed  # no example of that language: counts 0
                continue
            nll = -lp[m, 2].sum() / tokens[m, 2].sum()
            assert abs(float(got[f"nll/{i}"]) - float(nll)) <= 1e-5 * abs(float(nll)), seed
            ref_margin = margins[m].mean()
            assert abs(float(got[f"rewards/margins/{i}"]) - float(ref_margin)) <= 1e-4 * (1 + abs(float(ref_margin)))
            assert abs(float(got[f"rewards/accuracies/{i}"]) - float((margins[m] > 0).double().mean())) < 1e-6, seed


def test_off_without_languages_and_named_after_them():
    g = torch.Generator().manual_seed(secrets.randbits(31))
    b = _batch(g, 4)
    assert LanguageMetrics([b], _setup(), [2], n_languages=1).result() == {}  # one language: nothing extra
    b.pop("languages")
    assert LanguageMetrics([b], _setup(), [2], n_languages=2).result() == {}
    sft = LossSetup(0.1, 1.0, (2,), False, (2,))
    b = _batch(g, 4)
    m = LanguageMetrics([b], sft, [2], n_languages=2)
    m.add(-torch.rand(4, 4, generator=g), b)
    assert set(m.result()) == {"nll/0", "nll/1"}  # sft mode: no preference term, no rewards
    named = name_languages({"nll/1": 1.0, "rewards/margins/0": 2.0, "en/rewards/margins": 3.0}, ["sw", "ko"])
    assert named == {"nll/ko": 1.0, "rewards/margins/sw": 2.0, "en/rewards/margins": 3.0}


def _two_rank_language_data(seed):
    """Rank 0's share holds only language 0; rank 1's holds languages 0 and 1 (language 2 nowhere)."""
    g = torch.Generator().manual_seed(seed)
    shares = []
    for langs in ([0, 0, 0], [1, 0, 1, 1, 1]):
        b = _batch(g, len(langs))
        b["languages"] = torch.tensor(langs)
        shares.append((b, -torch.rand(len(langs), 4, generator=g, dtype=torch.float64) * 50))
    return shares


def _language_metrics_worker(rank, init_file, seed, results):
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        b, lp = _two_rank_language_data(seed)[rank]
        m = LanguageMetrics([b], _setup(), [2], n_languages=3)
        m.add(lp, b)
        results[rank] = {k: float(v) for k, v in m.result().items()}
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow  # starts processes for several seconds
def test_per_language_metrics_are_means_over_every_rank(tmp_path):
    """A language missing from one rank's share is averaged over the ranks that hold it (one all-reduce of sums
    and counts), not pulled towards 0: each rank logs the float64 mean over the whole step."""
    import torch.multiprocessing as mp

    seed = secrets.randbits(31)
    results = mp.Manager().dict()
    mp.spawn(_language_metrics_worker, args=(str(tmp_path / "init"), seed, results), nprocs=2)
    shares = _two_rank_language_data(seed)
    lang = torch.cat([b["languages"] for b, _ in shares])
    lp = torch.cat([lp for _, lp in shares])
    ref = torch.cat([b["ref_logps"] for b, _ in shares])
    tokens = torch.cat([b["response_tokens"] for b, _ in shares]).double()
    margins = 0.1 * torch.stack([(lp - ref)[:, 0] - (lp - ref)[:, 1], (lp - ref)[:, 2] - (lp - ref)[:, 3]], dim=1)
    assert results[0] == results[1], seed  # every rank logs the same step means
    got = results[0]
    for i in (0, 1):
        m = lang == i
        nll = float(-lp[m, 2].sum() / tokens[m, 2].sum())
        assert abs(got[f"nll/{i}"] - nll) <= 1e-9 * abs(nll), (seed, i)
        assert abs(got[f"rewards/margins/{i}"] - float(margins[m].mean())) <= 1e-9 * (1 + abs(float(margins[m].mean())))
        assert got[f"rewards/accuracies/{i}"] == pytest.approx(float((margins[m] > 0).double().mean()), abs=1e-12)
    assert got["nll/2"] == 0.0  # no example of language 2 on any rank
