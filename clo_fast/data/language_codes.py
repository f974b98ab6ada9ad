"""Language codes as translation models spell them: ISO 639-1 ↔ FLORES-200 (NLLB), and the 3-letter variants
Marian models use (`clo_fast/data/translate.py` resolves a model's codes with these)."""

from __future__ import annotations

# ISO 639-1 -> FLORES-200 (NLLB) codes for the common cases; users may also give FLORES codes directly.
FLORES_CODES = {
    "en": "eng_Latn",
    "ko": "kor_Hang",
    "sw": "swh_Latn",
    "zh": "zho_Hans",
    "de": "deu_Latn",
    "id": "ind_Latn",
    "yo": "yor_Latn",
    "fr": "fra_Latn",
    "es": "spa_Latn",
    "ja": "jpn_Jpan",
    "ru": "rus_Cyrl",
    "ar": "arb_Arab",
    "hi": "hin_Deva",
    "pt": "por_Latn",
    "it": "ita_Latn",
    "vi": "vie_Latn",
    "th": "tha_Thai",
    "tr": "tur_Latn",
    "nl": "nld_Latn",
    "pl": "pol_Latn",
    "uk": "ukr_Cyrl",
    "bn": "ben_Beng",
    "ta": "tam_Taml",
    "te": "tel_Telu",
    "ur": "urd_Arab",
    "fa": "pes_Arab",
    "he": "heb_Hebr",
    "el": "ell_Grek",
    "cs": "ces_Latn",
    "sv": "swe_Latn",
    "fi": "fin_Latn",
    "da": "dan_Latn",
    "hu": "hun_Latn",
    "ro": "ron_Latn",
    "ms": "zsm_Latn",
    "tl": "tgl_Latn",
    "am": "amh_Ethi",
    "ha": "hau_Latn",
    "ig": "ibo_Latn",
    "zu": "zul_Latn",
    "xh": "xho_Latn",
    "so": "som_Latn",
    "rw": "kin_Latn",
    "bg": "bul_Cyrl",
    "ca": "cat_Latn",
    "hr": "hrv_Latn",
    "sk": "slk_Latn",
    "sl": "slv_Latn",
    "sr": "srp_Cyrl",
    "lt": "lit_Latn",
    "lv": "lvs_Latn",
    "et": "est_Latn",
    "no": "nob_Latn",
    "nb": "nob_Latn",
    "mr": "mar_Deva",
    "gu": "guj_Gujr",
    "kn": "kan_Knda",
    "ml": "mal_Mlym",
    "pa": "pan_Guru",
    "ne": "npi_Deva",
}
ISO1_FROM_FLORES = {v: k for k, v in FLORES_CODES.items()}
# Macrolanguage / alternative 3-letter codes Marian models may use.
ISO3_ALTERNATIVES = {
    "sw": ["swa", "swh"],
    "zh": ["zho", "cmn"],
    "ar": ["ara", "arb"],
    "fa": ["fas", "pes"],
    "ms": ["msa", "zsm"],
    "no": ["nor", "nob"],
    "lv": ["lav", "lvs"],
    "et": ["est", "ekk"],
}


def marian_candidates(code: str) -> list[str]:
    """The spellings a Marian model may use for `code` (as given, ISO 639-1, the FLORES 3-letter part, variants)."""
    iso1 = ISO1_FROM_FLORES.get(code, code)
    cands = [code, iso1]
    if iso1 in FLORES_CODES:
        cands.append(FLORES_CODES[iso1].split("_")[0])
    cands += ISO3_ALTERNATIVES.get(iso1, [])
    return list(dict.fromkeys(cands))
