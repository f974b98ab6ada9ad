"""Translation backends and cache: a tiny random M2M100 built here, loaded through the real `hf` path."""

import importlib
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from clo_fast.config import DataConfig, QualitySettings
from clo_fast.data import DataError, build_text_dataset, demo_data_path
from clo_fast.data.translate import (
    HFTranslator,
    TranslationCache,
    TranslationError,
    UnknownLanguageError,
    _restore_inline,
    _split_long,
    resolve_language_codes,
    segment_text,
)

importlib.import_module("sentencepiece")  # the `test` extra: a missing package fails, never skips


def _demo_rows():
    return [json.loads(line) for line in demo_data_path().read_text(encoding="utf-8").splitlines()]


def _translator(model_dir, cache_path, **kw):
    kw = {"batch_size": 4, "max_length": 24, "num_beams": 1, "progress": False, "device": "cpu", **kw}
    return HFTranslator(model_dir, "en", kw.pop("tgt", "sw"), cache=TranslationCache(cache_path), **kw)


TEXTS = [
    "What is the capital of France?",
    "The capital of France is Paris. It is a large city with many museums.",
    "Use `len(my_list)` to count the items.\n\n```python\nfor i in range(3):\n    print(i)\n```\n\nThat is all.",
    "1. Go to bed early.\n2. Avoid screens.\n\n- Keep the room dark.",
    "Short.",
]


def test_hf_translates_with_language_token_and_cache_makes_rerun_free(tiny_m2m, tmp_path):
    tr = _translator(tiny_m2m, tmp_path / "c.sqlite")
    assert tr.family == "m2m100" and tr.codes["tgt"] == "sw"
    assert tr.codes["forced_bos_token_id"] == tr.tokenizer.get_lang_id("sw")
    out = tr.translate(TEXTS + [TEXTS[0]])  # a duplicate is translated once
    assert len(out) == len(TEXTS) + 1 and out[0] == out[-1]
    assert tr.model_calls > 0 and tr.stats["translated"] == len(TEXTS)
    assert not any(re.search(r"__[a-z]{2,3}__|</s>|<pad>", o) for o in out)  # no language / special tokens leak
    tr2 = _translator(tiny_m2m, tmp_path / "c.sqlite")
    out2 = tr2.translate(TEXTS)
    assert tr2.model_calls == 0 and tr2.stats["cache_hits"] == len(TEXTS)
    assert out2 == out[: len(TEXTS)]
    # another target language is another cache key
    tr3 = _translator(tiny_m2m, tmp_path / "c.sqlite", tgt="ko")
    tr3.translate(TEXTS[:1])
    assert tr3.model_calls == 1


def test_interrupted_run_resumes_from_cache(tiny_m2m, tmp_path):
    texts = [r["response"] for r in _demo_rows()[:10]]
    ref = _translator(tiny_m2m, tmp_path / "ref.sqlite", batch_size=2).translate(texts)

    tr = _translator(tiny_m2m, tmp_path / "c.sqlite", batch_size=2)
    real = tr._generate
    calls = {"n": 0}

    def flaky(batch):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C during the 4th batch
        calls["n"] += 1
        return real(batch)

    tr._generate = flaky
    with pytest.raises(KeyboardInterrupt):
        tr.translate(texts)
    cache = TranslationCache(tmp_path / "c.sqlite")  # reopens cleanly
    assert len(cache) == 6  # three committed batches of two pieces, nothing else
    tr2 = _translator(tiny_m2m, tmp_path / "c.sqlite", batch_size=2)
    out = tr2.translate(texts)
    assert out == ref
    assert tr2.stats["piece_cache_hits"] == 6
    total_pieces = 6 + tr2.stats["pieces_translated"]
    tr3 = _translator(tiny_m2m, tmp_path / "c.sqlite", batch_size=2)
    assert tr3.translate(texts) == ref and tr3.model_calls == 0
    assert total_pieces == tr.stats["pieces_translated"] + tr2.stats["pieces_translated"]


def test_code_blocks_and_layout_survive_translation(tiny_m2m, tmp_path):
    tr = _translator(tiny_m2m, tmp_path / "c.sqlite")
    text = TEXTS[2] + "\n" + TEXTS[3]
    (out,) = tr.translate([text])
    assert "```python\nfor i in range(3):\n    print(i)\n```\n" in out
    assert "`len(my_list)`" in out
    assert "\n1. " in out and "\n2. " in out and "\n- " in out
    assert out.count("\n") == text.count("\n")


def test_inline_code_placeholders_restored_when_model_keeps_them(tiny_m2m, tmp_path):
    tr = _translator(tiny_m2m, tmp_path / "c.sqlite", max_length=64)
    seen = []

    def fake(batch):  # a "model" that upper-cases and keeps [[n]] placeholders
        seen.extend(batch)
        return [b.upper() for b in batch]

    tr._generate = fake
    (out,) = tr.translate(["Call `f(x)` then `g(y)` now."])
    assert out == "CALL `f(x)` THEN `g(y)` NOW."
    assert seen == ["Call [[0]] then [[1]] now."] and tr.stats["inline_code_fallbacks"] == 0
    assert _restore_inline("A [[0]] B", ["`x`"]) == "A `x` B"
    assert _restore_inline("A B", ["`x`"]) is None  # placeholder lost -> fallback


def test_segment_text_roundtrip_and_code_kept():
    for r in _demo_rows():
        for t in (r["response"], r["instruction"]):
            assert "".join(s for _, s in segment_text(t)) == t
    parts = segment_text("Intro.\n```\ncode here\n```\n## Title\n42\n")
    assert parts == [
        ("prose", "Intro."),
        ("code", "\n```\ncode here\n```\n## "),
        ("prose", "Title"),
        ("code", "\n42\n"),
    ]
    # unterminated fence: the rest is code
    assert segment_text("Hi.\n```\nx = 1") == [("prose", "Hi."), ("code", "\n```\nx = 1")]


def test_long_text_split_at_sentences_and_rejoined(tiny_m2m, tmp_path):
    def words(s):
        return len(s.split())

    s = "One two three. Four five six seven. Eight nine. Ten eleven twelve thirteen fourteen fifteen sixteen."
    pieces = _split_long(s, 5, words)
    assert all(words(p) <= 5 for p in pieces)
    assert " ".join(pieces).split() == s.split()
    assert pieces[0] == "One two three." and pieces[1] == "Four five six seven."
    # through the model: a long line becomes several pieces, every one under the limit
    tr = _translator(tiny_m2m, tmp_path / "c.sqlite", max_length=16)
    seen = []
    real = tr._generate
    tr._generate = lambda b: (seen.extend(b), real(b))[1]
    long = " ".join(r["response"] for r in _demo_rows()[:4])
    (out,) = tr.translate([long])
    assert len(seen) > 3 and all(tr.count_tokens(p) <= 16 for p in seen)
    assert out.strip()


def test_unknown_language_code_names_model_and_code(tiny_m2m, tmp_path):
    with pytest.raises(UnknownLanguageError, match=r"does not know target language 'xx'") as e:
        _translator(tiny_m2m, tmp_path / "c.sqlite", tgt="xx")
    assert tiny_m2m in str(e.value)
    cfg = DataConfig(
        translator="hf",
        translation_model=tiny_m2m,
        target_lang="qq",
        cache_dir=str(tmp_path),
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(UnknownLanguageError, match="'qq'"):
        build_text_dataset(cfg, progress=False)
    # a FLORES code for a language M2M100 knows is accepted
    assert _translator(tiny_m2m, tmp_path / "c.sqlite", tgt="swh_Latn").codes["tgt"] == "sw"


def test_language_code_families():
    class Nllb:
        def get_vocab(self):
            return {"eng_Latn": 5, "swh_Latn": 6, "kor_Hang": 7, "hello": 8}

        def convert_tokens_to_ids(self, t):
            return self.get_vocab()[t]

    c = resolve_language_codes("nllb", "en", "sw", Nllb(), "facebook/nllb-200-distilled-600M")
    assert c["src"] == "eng_Latn" and c["tgt"] == "swh_Latn" and c["forced_bos_token_id"] == 6
    assert resolve_language_codes("nllb", "eng_Latn", "kor_Hang", Nllb())["tgt"] == "kor_Hang"
    with pytest.raises(UnknownLanguageError, match="'yo'"):
        resolve_language_codes("nllb", "en", "yo", Nllb(), "nllb")

    class MarianMulti:
        supported_language_codes = [">>swa<<", ">>kor<<", ">>fra<<"]

    c = resolve_language_codes("marian", "en", "sw", MarianMulti(), "Helsinki-NLP/opus-mt-en-mul")
    assert c["prefix"] == ">>swa<< " and c["forced_bos_token_id"] is None
    assert resolve_language_codes("marian", "en", "ko", MarianMulti(), "x")["prefix"] == ">>kor<< "
    with pytest.raises(UnknownLanguageError):
        resolve_language_codes("marian", "en", "yo", MarianMulti(), "x")

    class MarianPair:
        supported_language_codes = []

    assert resolve_language_codes("marian", "en", "sw", MarianPair(), "Helsinki-NLP/opus-mt-en-sw")["prefix"] == ""
    with pytest.raises(UnknownLanguageError, match="'ko'"):
        resolve_language_codes("marian", "en", "ko", MarianPair(), "Helsinki-NLP/opus-mt-en-sw")


def test_build_text_dataset_with_hf_backend_and_cached_rebuild(tiny_m2m, tmp_path):
    cfg = DataConfig(
        translator="hf",
        translation_model=tiny_m2m,
        target_lang="sw",
        max_examples=6,
        translation_batch_size=8,
        translation_max_length=20,
        translation_num_beams=1,
        translation_device="cpu",
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        on_bad_record="skip",
        eval_fraction=0.0,
        quality=QualitySettings(enabled=False),  # the random model's output is no language: tests/test_data_quality.py
    )
    dsd, summary = build_text_dataset(cfg, progress=False)
    tr = summary["translation"]
    assert tr["model_calls"] > 0 and tr["cache_hits"] == 0
    n = summary["kept"] + summary["skipped_bad_records"].get("empty_translation", 0)
    assert n == 6 and len(dsd["train"]) == summary["kept"]
    for row in dsd["train"]:
        assert row["target_lang"] == "sw" and row["prompt_tgt"].strip() and row["response_tgt"].strip()
    dsd2, summary2 = build_text_dataset(cfg, progress=False)
    t2 = summary2["translation"]
    assert t2["model_calls"] == 0 and t2["cache_hits"] == t2["texts"] == tr["texts"]
    assert dsd2["train"]["response_tgt"] == dsd["train"]["response_tgt"]


def test_empty_translation_is_an_error_naming_record(tmp_path):
    class Blank:
        name = "blank"
        stats: dict = {}

        def translate_pairs(self, pairs, src, tgt):
            return [("x", "") for _ in pairs]

    cfg = DataConfig(translator="hf", max_examples=2, cache_dir=str(tmp_path), output_dir=str(tmp_path / "o"))
    with pytest.raises(
        DataError, match=r"demo_en_ko_sw.jsonl: line \d+: field 'response': the ko translation is empty"
    ):
        build_text_dataset(cfg, translator=Blank(), progress=False)


class _LockedAtFirst:
    """sqlite3.connect whose first `locked` connections fail their setup with "database is locked", as ranks
    opening one shared cache at the same instant saw in CI (a WAL switch meeting another rank's lock)."""

    def __init__(self, locked: int, message: str = "database is locked"):
        import sqlite3

        self.real, self.locked, self.message, self.connects = sqlite3.connect, locked, message, 0

    def __call__(self, *args, **kwargs):
        import sqlite3

        self.connects += 1
        db = self.real(*args, **kwargs)
        if self.connects > self.locked:
            return db
        message = self.message

        class Failing:
            def execute(self, sql, *a):
                if sql.startswith("PRAGMA journal_mode"):
                    raise sqlite3.OperationalError(message)
                return db.execute(sql, *a)

            def close(self):
                db.close()

        return Failing()


def test_cache_open_retries_a_locked_database_and_names_other_errors(tmp_path, monkeypatch):
    import clo_fast.data.translate as translate

    flaky = _LockedAtFirst(locked=2)
    monkeypatch.setattr(translate.sqlite3, "connect", flaky)
    cache = TranslationCache(tmp_path / "c.sqlite")
    assert flaky.connects == 3  # two locked attempts, then the open that worked
    cache.put_many("m", "en", "sw", [("hello", "habari")])
    assert cache.get_many("m", "en", "sw", ["hello"]) == {"hello": "habari"}

    broken = _LockedAtFirst(locked=10, message="disk I/O error")  # not a lock: no retry, the file is named
    monkeypatch.setattr(translate.sqlite3, "connect", broken)
    with pytest.raises(TranslationError, match=r"d\.sqlite: the translation cache cannot be read \(disk I/O error\)"):
        TranslationCache(tmp_path / "d.sqlite")
    assert broken.connects == 1


def test_corrupt_translation_cache_names_the_file_and_is_kept(tmp_path):
    from clo_fast.data.translate import TranslationCache, TranslationError

    path = tmp_path / "translations.sqlite"
    path.write_bytes(b"this is not a database, just 64 bytes of something else entirely.")
    with pytest.raises(TranslationError, match=r"translations.sqlite: the translation cache cannot be read"):
        TranslationCache(path)
    assert path.read_bytes().startswith(b"this is not a database")  # the user's file is left as it was
