"""clo_fast/training/scoring.py: the held-out English NLL the English guard reads, against a float64 count."""

from __future__ import annotations

import torch

from clo_fast.training.scoring import english_nll


def test_english_nll_is_sequence_zero_per_token_in_float64():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    for _ in range(20):
        n = int(torch.randint(1, 9, (1,), generator=g))
        counts = torch.randint(1, 60, (n, 4), generator=g).float()
        logps = -torch.rand(n, 4, generator=g, dtype=torch.float64) * counts.double() * 4
        ref = -torch.rand(n, 4, generator=g, dtype=torch.float64) * counts.double() * 4
        out = english_nll(logps.float(), counts, ref.float())
        tokens = counts[:, 0].double().sum()
        assert abs(out["eval/en/nll_per_token"] - float(-logps[:, 0].sum() / tokens)) < 1e-5
        assert abs(out["eval/en/ref_nll_per_token"] - float(-ref[:, 0].sum() / tokens)) < 1e-5
        assert "eval/en/ref_nll_per_token" not in english_nll(logps.float(), counts, None)
