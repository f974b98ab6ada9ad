"""The language-ID wrapper (clo_fast.language_id) on canned sentences with known languages."""

import importlib

import pytest

from clo_fast.language_id import (
    LanguageIdentifier,
    UnknownLanguageError,
    candidate_languages,
    get_identifier,
    language_fidelity,
    normalize_lang,
)

importlib.import_module("lingua")  # the `test` extra: a missing package fails, never skips

CANNED = {
    "en": "The weather is lovely today, so we are going for a walk in the park after lunch.",
    "de": "Das Wetter ist heute schön, deshalb gehen wir nach dem Mittagessen im Park spazieren.",
    "ko": "오늘은 날씨가 좋아서 점심을 먹은 후에 공원에서 산책을 할 거예요.",
    "zh": "今天天气很好，所以我们吃完午饭后要去公园散步。",
    "id": "Cuaca hari ini sangat cerah, jadi kami akan berjalan-jalan di taman setelah makan siang.",
    "sw": "Hali ya hewa ni nzuri leo, kwa hivyo tutatembea katika bustani baada ya chakula cha mchana.",
    "yo": "Ojú ọjọ́ dára lónìí, nítorí náà a ó rìn kiri nínú ọgbà lẹ́yìn oúnjẹ ọ̀sán.",
}


@pytest.fixture(scope="module")
def lid():
    return get_identifier(["en", "ko"])


@pytest.mark.parametrize("lang", sorted(CANNED))
def test_detects_known_languages(lid, lang):
    assert lid.detect(CANNED[lang]) == lang


def test_batch_matches_single_and_handles_letterless(lid):
    texts = [CANNED["sw"], "", "12345 !?", CANNED["zh"], "   "]
    assert lid.detect_batch(texts) == ["sw", None, None, "zh", None]
    assert lid.detect_batch([]) == []
    with pytest.raises(TypeError):
        lid.detect_batch(["ok", None])


def test_candidate_set_is_small_and_has_confusers():
    cands = candidate_languages(["en", "id"])
    assert {"en", "id", "ms", "tl", "zh", "de", "ko", "sw", "yo"} <= set(cands)
    assert len(cands) < 20  # restricted detector: fast to build, ~100 MB instead of ~1.2 GB
    assert "ru" in candidate_languages(["ko"], extra=["ru"]) and "ja" in candidate_languages(["ko"])


def test_detector_confined_to_candidates():
    exact = LanguageIdentifier(["en", "de"], exact=True)
    assert exact.languages == ("de", "en")
    assert exact.detect(CANNED["ko"]) in ("de", "en", None)  # Korean is not a candidate here
    with pytest.raises(ValueError, match="at least two"):
        LanguageIdentifier(["en"], exact=True)


def test_normalize_lang():
    assert normalize_lang("KO") == "ko"
    assert normalize_lang("zh-CN") == "zh"
    assert normalize_lang("pt_BR") == "pt"
    for bad in ("xx", "", "klingon"):
        with pytest.raises(UnknownLanguageError, match="unknown language code|non-empty"):
            normalize_lang(bad)
    with pytest.raises(UnknownLanguageError, match="'xq'"):
        get_identifier(["en", "xq"])


def test_fidelity_arithmetic():
    assert language_fidelity(["ko", "ko", "en", None], "ko") == 0.5
    assert language_fidelity(["ko", "ko", "en", None], "en") == 0.25
    assert language_fidelity(["sw"], "SW") == 1.0
    assert language_fidelity([None, None], "en") == 0.0
    with pytest.raises(ValueError, match="no responses"):
        language_fidelity([], "en")


def test_fidelity_on_canned_responses(lid):
    responses = [CANNED["ko"], CANNED["en"], CANNED["ko"], "", CANNED["zh"]]
    detected = lid.detect_batch(responses)
    assert detected == ["ko", "en", "ko", None, "zh"]
    assert language_fidelity(detected, "ko") == pytest.approx(2 / 5)
