"""clo_fast.evaluate.report."""

from __future__ import annotations


def test_redaction_keeps_ordinary_text():
    from clo_fast.evaluate.report import redact_secrets

    assert redact_secrets({"m": ["tokens/s 12", "eval/loss 0.5"]}) == {"m": ["tokens/s 12", "eval/loss 0.5"]}
    assert redact_secrets("https://u:p@h/v1?key=1 Authorization: Bearer abc") == (
        "https://<redacted>@h/v1?<redacted> Authorization: <redacted> <redacted>"
    )
