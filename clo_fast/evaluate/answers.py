"""Degenerate answers: what a language detector alone passes. A model that cannot answer in the target language
still "answers in it" by echoing the prompt or by looping on a few words; a capped answer may be cut mid-way. An
answer counts as faithful (the report's `fidelity`) only when it is in the prompt's language, is not an echo of
the prompt and does not loop; the echo, loop and finished-before-the-cap rates are reported beside it.

Words are `clo_fast.data.quality.words` (casefolded; ideographs and kana one by one), so the rules hold for
scripts without spaces too. Thresholds are stated once, here:
- echo: at least `ECHO_MIN_WORDS` words, at least `ECHO_MIN_COVER` of the prompt's word count, and no word the
  prompt lacks — a copy, not an answer ("Mto mrefu zaidi duniani ni upi." to that question). An answer that
  restates the question and adds the answer ("Rangi ya X ni nyekundu") has a new word and is no echo; a short
  answer made of the prompt's words ("Blue.") is too short to be one.
- loop: some n-gram (n <= `LOOP_MAX_NGRAM`) `LOOP_RUN` or more times back to back ("kama kama kama"), or more
  than `LOOP_REPEATED_SHARE` of the answer's word trigrams repeating an earlier trigram ("... is the tallest is
  the highest is the tallest is ...") once it has `LOOP_MIN_WORDS` words, or a run of letters repeating itself
  inside a word, a unit of up to `CHAR_LOOP_MAX_UNIT` characters that starts with a letter `CHAR_LOOP_RUN` or more
  times back to back ("kabirimajimimimimimi...": one long word to the word rules; "1000000" and "......" are not).
"""

from __future__ import annotations

import re

from clo_fast.data.quality import longest_repeat, words

ECHO_MIN_WORDS = 3
ECHO_MIN_COVER = 0.5
LOOP_MAX_NGRAM = 4
LOOP_RUN = 3
LOOP_MIN_WORDS = 12
LOOP_REPEATED_SHARE = 0.25
CHAR_LOOP_MAX_UNIT = 8
CHAR_LOOP_RUN = 5
_CHAR_LOOP = re.compile(rf"([^\W\d_]\S{{0,{CHAR_LOOP_MAX_UNIT - 1}}}?)\1{{{CHAR_LOOP_RUN - 1},}}")


def repeated_trigram_share(tokens: list[str]) -> float:
    """The share of the word trigrams that occurred earlier in the same answer (0 for fewer than 3 words)."""
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def is_echo(prompt: str, answer: str) -> bool:
    p, a = words(prompt), words(answer)
    if len(a) < ECHO_MIN_WORDS or len(a) < ECHO_MIN_COVER * len(p):
        return False
    return set(a) <= set(p)


def is_loop(answer: str) -> bool:
    if _CHAR_LOOP.search(answer):
        return True
    a = words(answer)
    if longest_repeat(a, LOOP_MAX_NGRAM) >= LOOP_RUN:
        return True
    return len(a) >= LOOP_MIN_WORDS and repeated_trigram_share(a) > LOOP_REPEATED_SHARE


def answer_flags(prompt: str, answer: str, lang: str, detected: str | None) -> dict:
    """{"echo", "loop", "in_language", "faithful"} of one answer to `prompt`, asked in `lang`."""
    echo, loop = is_echo(prompt, answer), is_loop(answer)
    in_language = detected == lang
    return {"echo": echo, "loop": loop, "in_language": in_language, "faithful": in_language and not (echo or loop)}
