"""The translation quality gate: machine translation of long answers fails in known ways (the wrong language, a
copy of the source, a repetition loop, a truncated or runaway output), and each bad pair teaches the preference
the wrong way round. Every translated field of a pair is checked against its English source; the first failed
check names the reason the pair is dropped (`REASONS`). Thresholds: `config.QualitySettings` (data.quality).

Code (fenced blocks, inline code) and double-quoted spans stay in the source language by design (the demo
data keeps quoted English words in its translations), so the language and repetition checks read the prose
around them only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from clo_fast.config import QualitySettings
from clo_fast.data.split import prompt_key
from clo_fast.data.translate import segment_text

# why a pair is dropped, in the order the checks run (cheap and specific first; the language identifier last)
REASONS = ("untranslated_copy", "repetition_loop", "length_ratio", "wrong_language")

_INLINE_CODE = re.compile(r"(`+)[^`\n]+?\1")
_QUOTED = re.compile(r'"[^"\n]*"|“[^”\n]*”|«[^»\n]*»|„[^“”\n]*[“”]|「[^」\n]*」|『[^』\n]*』')
# words; ideographs and kana one by one (those scripts write no spaces between words)
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]|[^\W\d_]+|\d+")


def prose(text: str, *, quotes: bool = False) -> str:
    """`text` without fenced code blocks and inline code (and double-quoted spans unless `quotes`)."""
    parts = "\n".join(s for kind, s in segment_text(text) if kind == "prose")
    parts = _INLINE_CODE.sub(" ", parts)
    return parts if quotes else _QUOTED.sub(" ", parts)


def letters(text: str) -> int:
    return sum(ch.isalpha() for ch in text)


def words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def longest_repeat(tokens: Sequence[str], max_ngram: int) -> int:
    """The most times any n-gram (n <= max_ngram) occurs back to back in `tokens` (1 when nothing repeats)."""
    best = 1
    for n in range(1, max_ngram + 1):
        run = 0  # positions i with tokens[i] == tokens[i + n], in a row: k back-to-back copies give (k - 1)·n
        for i in range(len(tokens) - n):
            run = run + 1 if tokens[i] == tokens[i + n] else 0
            best = max(best, run // n + 1)
    return best


def copy_similarity(source: str, translation: str) -> float:
    """difflib's ratio (2·matches / total) of the two texts' word sequences: 1 for a copy, low for a translation
    (names and numbers are all two languages share)."""
    a, b = words(source), words(translation)
    if not a or not b:
        return 0.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


@dataclass
class Verdict:
    """Why a field fails the gate: its reason (one of REASONS) and a readable detail."""

    reason: str
    detail: str


def check_field(source: str, translation: str, q: QualitySettings) -> Verdict | None:
    """The checks that need no language identifier, on one translated field."""
    if letters(prose(source, quotes=True)) and prompt_key(source) == prompt_key(translation):
        return Verdict("untranslated_copy", "the translation equals the source")
    src_prose, tgt_prose = prose(source), prose(translation)
    sim = copy_similarity(src_prose, tgt_prose)
    if sim >= q.max_copy_similarity:
        return Verdict("untranslated_copy", f"its words match the source's at {sim:.2f} (max {q.max_copy_similarity})")
    reps = longest_repeat(words(tgt_prose), q.repeat_max_ngram)
    if reps > q.max_repeats and reps > longest_repeat(words(src_prose), q.repeat_max_ngram):
        return Verdict("repetition_loop", f"a phrase repeats {reps} times in a row (max {q.max_repeats})")
    if len(source) >= q.length_ratio_min_chars:
        ratio = len(translation) / len(source)
        if not q.min_length_ratio <= ratio <= q.max_length_ratio:
            band = f"[{q.min_length_ratio}, {q.max_length_ratio}]"
            return Verdict(
                "length_ratio", f"{len(translation)} characters for {len(source)}: ratio {ratio:.2f} not in {band}"
            )
    return None


def gate_pairs(
    fields: Sequence[Sequence[tuple[str, str, str]]], langs: Sequence[str], q: QualitySettings, identifier=None
) -> list[tuple[str, Verdict] | None]:
    """For each pair (its translated fields as (name, source, translation) and its target language): None when
    it passes, else (the failing field's name, the verdict). `identifier(texts) -> codes` defaults to
    `language_id.get_identifier` over the pairs' languages; the language check runs once, batched, over the
    fields of the pairs that passed the other checks."""
    out: list[tuple[str, Verdict] | None] = [None] * len(fields)
    if not q.enabled:
        return out
    for k, pair in enumerate(fields):
        for name, src, tgt in pair:
            v = check_field(src, tgt, q)
            if v is not None:
                out[k] = (name, v)
                break
    if not q.language_id:
        return out
    todo = [  # (pair, field name, prose) of the fields long enough for the identifier
        (k, name, text)
        for k, pair in enumerate(fields)
        if out[k] is None
        for name, _, tgt in pair
        for text in [prose(tgt)]
        if letters(text) >= q.language_min_letters
    ]
    if not todo:
        return out
    if identifier is None:
        from clo_fast.language_id import get_identifier

        identifier = get_identifier(sorted(set(langs))).detect_batch
    found = identifier([t for _, _, t in todo])
    for (k, name, _), code in zip(todo, found, strict=True):
        if out[k] is None and code != langs[k]:
            out[k] = (name, Verdict("wrong_language", f"identified as {code!r}, expected {langs[k]!r}"))
    return out
