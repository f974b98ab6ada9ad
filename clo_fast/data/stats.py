"""Length summaries for the dataset reports."""

from __future__ import annotations

from collections.abc import Sequence


def percentiles(values: Sequence[int]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(p: float) -> int:
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {
        "n": len(v),
        "min": v[0],
        "p50": q(50),
        "p90": q(90),
        "p99": q(99),
        "max": v[-1],
        "mean": round(sum(v) / len(v), 1),
    }
