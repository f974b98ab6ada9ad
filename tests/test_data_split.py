"""clo_fast.data.split."""

from __future__ import annotations

import pytest

from clo_fast.config import ConfigError


def test_an_empty_split_is_an_error():
    from clo_fast.data.split import require_examples

    require_examples("train", 3, "unused")
    with pytest.raises(ConfigError, match="the eval split has no examples: all 4 prompts are longer"):
        require_examples("eval", 0, "all 4 prompts are longer than data.max_length (8 tokens)")
