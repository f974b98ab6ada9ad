"""Per-language step metrics (clo_fast/training/step.py, data.target_langs): the batches carry each example's
language and `LanguageMetrics` gives nll/<lang>, rewards/margins/<lang>, rewards/accuracies/<lang>, checked
against a float64 reference on fresh random log-probs, languages and token counts."""

import secrets

import torch

from clo_fast.training.step import LanguageMetrics, LossSetup, name_languages


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
