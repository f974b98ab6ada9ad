"""clo_fast.evaluate.report."""

from __future__ import annotations


def test_redaction_keeps_ordinary_text():
    from clo_fast.evaluate.report import redact_secrets

    assert redact_secrets({"m": ["tokens/s 12", "eval/loss 0.5"]}) == {"m": ["tokens/s 12", "eval/loss 0.5"]}
    assert redact_secrets("https://u:p@h/v1?key=1 Authorization: Bearer abc") == (
        "https://<redacted>@h/v1?<redacted> Authorization: <redacted> <redacted>"
    )


def test_bootstrap_interval_covers_the_mean_and_matches_the_normal_width():
    import numpy as np

    from clo_fast.evaluate.report import bootstrap_interval

    rng = np.random.default_rng()
    for _ in range(5):
        p, n = rng.uniform(0.2, 0.8), int(rng.integers(200, 400))
        x = (rng.random(n) < p).astype(float)
        lo, hi = bootstrap_interval(lambda i, x=x: x[i].mean(), n)
        half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / n)
        assert lo < x.mean() < hi and abs((hi - lo) / 2 - half) < 0.25 * half
    assert bootstrap_interval(lambda i: 1.0, 1) is None
    assert bootstrap_interval(lambda i: 0.5, 10) == [0.5, 0.5]
