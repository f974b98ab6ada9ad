"""Language identification for the evaluation (which language did the model answer in?).

A thin wrapper over `lingua-language-detector` (the `lingua` import): it works offline (its language
models ship inside the wheel), covers every language of the CLO paper (zh, de, ko, id, sw, yo) and
English, and is maintained. The module is named `language_id`, not `langid`, so that it never shadows
the PyPI package of that name.

The detector is restricted to a small candidate set: the languages under test, English and a few
languages that are easy to confuse with them (ja for zh/ko, ms/tl for id, nl for de ...). Building it
over ~15 languages takes ~0.3 s and ~100 MB; over all 75 lingua languages it takes ~4.5 s and ~1.2 GB
(measured on the CPU dev machine). Detectors are cached per candidate set.

Codes are ISO 639-1 (`ko`, `sw`, ...); a region or script suffix is dropped (`zh-CN` -> `zh`,
`pt_BR` -> `pt`). Texts with no letters (empty, digits, punctuation) are identified as None, which
counts as *not* the prompt's language in the fidelity.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

# Languages always in the candidate set: English plus the CLO paper's six targets ...
PAPER_LANGUAGES = ("en", "zh", "de", "ko", "id", "sw", "yo")
# ... and confusers: languages a detector (or a drifting model) mixes up with them.
CONFUSERS = {
    "zh": ("ja",),
    "ko": ("ja",),
    "ja": ("zh", "ko"),
    "de": ("nl", "da"),
    "id": ("ms", "tl"),
    "ms": ("id",),
    "sw": ("so",),
    "en": ("fr", "es"),
}


class UnknownLanguageError(ValueError):
    """A language code the language-ID package does not know."""


def _lingua():
    try:
        import lingua
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "language identification needs `lingua-language-detector`: pip install 'clo-fast[eval]' "
            "(or pip install lingua-language-detector)"
        ) from e
    return lingua


@functools.lru_cache(maxsize=1)
def supported_languages() -> frozenset[str]:
    """ISO 639-1 codes the detector can identify (lowercase)."""
    lingua = _lingua()
    return frozenset(lang.iso_code_639_1.name.lower() for lang in lingua.Language.all())


def normalize_lang(code: str) -> str:
    """`'KO'`, `'ko'`, `'zh-CN'`, `'pt_BR'` -> ISO 639-1 lowercase; unknown codes raise UnknownLanguageError."""
    if not isinstance(code, str) or not code.strip():
        raise UnknownLanguageError(f"language code must be a non-empty string, got {code!r}")
    base = code.strip().replace("_", "-").split("-")[0].lower()
    if base not in supported_languages():
        raise UnknownLanguageError(
            f"unknown language code {code!r} (expected an ISO 639-1 code that lingua-language-detector "
            f"supports: {', '.join(sorted(supported_languages()))})"
        )
    return base


def candidate_languages(languages: Iterable[str], extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The detector's candidate set for evaluating `languages`: those, their confusers, the paper's
    languages and English, plus `extra`. Sorted, normalised, duplicates removed."""
    wanted = [normalize_lang(c) for c in languages] + [normalize_lang(c) for c in extra]
    out = set(wanted) | set(PAPER_LANGUAGES)
    for c in wanted:
        out.update(CONFUSERS.get(c, ()))
    return tuple(sorted(out))


class LanguageIdentifier:
    """Identify the language of texts among a fixed candidate set.

    >>> lid = LanguageIdentifier(["en", "ko"])          # candidates: en, ko + confusers + paper languages
    >>> lid.detect("안녕하세요, 반갑습니다.")
    'ko'
    """

    def __init__(self, languages: Iterable[str], extra: Iterable[str] = (), *, exact: bool = False):
        """`exact=True` uses exactly `languages` (at least two) as candidates, without additions."""
        lingua = _lingua()
        if exact:
            codes = tuple(sorted({normalize_lang(c) for c in languages}))
            if len(codes) < 2:
                raise ValueError(f"exact=True needs at least two candidate languages, got {codes}")
        else:
            codes = candidate_languages(languages, extra)
        self.languages = codes
        langs = [lingua.Language.from_iso_code_639_1(getattr(lingua.IsoCode639_1, c.upper())) for c in codes]
        self._detector = lingua.LanguageDetectorBuilder.from_languages(*langs).with_preloaded_language_models().build()

    @staticmethod
    def _code(lang) -> str | None:
        return None if lang is None else lang.iso_code_639_1.name.lower()

    def detect(self, text: str) -> str | None:
        """ISO 639-1 code of the most likely language, or None (no letters / undecidable)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if not any(ch.isalpha() for ch in text):
            return None
        return self._code(self._detector.detect_language_of(text))

    def detect_batch(self, texts: Sequence[str]) -> list[str | None]:
        """`detect` over a list (lingua runs the batch on its own thread pool)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be str, got {type(t).__name__}")
        idx = [i for i, t in enumerate(texts) if any(ch.isalpha() for ch in t)]
        out: list[str | None] = [None] * len(texts)
        if idx:
            found = self._detector.detect_languages_in_parallel_of([texts[i] for i in idx])
            for i, lang in zip(idx, found, strict=False):
                out[i] = self._code(lang)
        return out


@functools.lru_cache(maxsize=4)
def _cached(codes: tuple[str, ...]) -> LanguageIdentifier:
    return LanguageIdentifier(codes, exact=True)


def get_identifier(languages: Iterable[str], extra: Iterable[str] = ()) -> LanguageIdentifier:
    """A cached LanguageIdentifier for evaluating `languages` (see `candidate_languages`)."""
    return _cached(candidate_languages(languages, extra))


def language_fidelity(detected: Sequence[str | None], expected: str) -> float:
    """Share of `detected` codes equal to `expected` (None counts as a miss). Empty input raises."""
    expected = normalize_lang(expected)
    if len(detected) == 0:
        raise ValueError("language_fidelity: no responses to score")
    return sum(1 for d in detected if d == expected) / len(detected)
