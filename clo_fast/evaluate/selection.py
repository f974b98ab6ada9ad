"""Choosing each method's settings on the validation split, by a rule written here before any run.

Every method gets the same treatment: its grid of settings (`clo_fast.compare.SEARCH_GRIDS`) is trained on the
search seeds, every model is evaluated on the validation entities (held out from training and from the test set),
and the setting with the highest SELECTION criterion wins:

    criterion = mean over the search seeds of ½ · (correct-and-in-language on English prompts
                                                  + correct-and-in-language on target-language prompts)

(the per-prompt "correct and in the prompt's language" of the validation prompts; without answers, fidelity).
Ties go to the setting listed first in the grid. The chosen settings are then trained on fresh seeds and evaluated
on the test entities only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SELECTION_RULE = (
    "the setting with the highest mean over the search seeds of ½·(English + target-language correct-and-in-language "
    "on the validation entities) wins; ties go to the first setting of the grid"
)


def setting_value(per_seed: Sequence[dict], target_lang: str) -> float:
    """The criterion of one setting from its per-seed validation means [{"en": x, target_lang: y}, ...]."""
    if not per_seed:
        raise ValueError("a setting needs at least one search seed")
    return math.fsum(0.5 * (s["en"] + s[target_lang]) for s in per_seed) / len(per_seed)


def choose(values: Sequence[float]) -> int:
    """Index of the winning setting: the highest criterion, the first one on ties."""
    if not values:
        raise ValueError("no settings to choose from")
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def validation_means(scores: dict, label: str, score: str | None = None) -> dict[str, float]:
    """{lang: mean of the per-prompt score} of one model in `comparison.prompt_scores` output; score: the
    strictest present ("correct_in_lang", else "fidelity") by default."""
    from clo_fast.evaluate.comparison import PROMPT_SCORES

    key = score or next(k for k in reversed(PROMPT_SCORES) if k in scores["scores"])
    per_lang = scores["models"][label]
    return {lang: math.fsum(v[key]) / len(v[key]) for lang, v in per_lang.items()}
