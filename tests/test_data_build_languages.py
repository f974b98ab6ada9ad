"""Several target languages in one run (data.target_langs, clo_fast/data/build.py and the evaluation prompts):
one CLO example per English pair and language, the English side shared, the split by English pair, each language
translated by its own translator and gated in its language; evaluation items for every language."""

import json
from collections import Counter

import pytest

from clo_fast.config import ConfigError, DataConfig, load_config
from clo_fast.data import build_text_dataset
from clo_fast.data.build import translate_sharded
from clo_fast.demo_model import demo_records
from clo_fast.evaluate.prompts import normalize_prompts


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), **kw)


def test_every_pair_gives_one_example_per_language_with_the_english_side_shared(tmp_path, rng):
    langs = rng.sample(["sw", "ko"], 2)
    n = rng.randint(20, 80)
    dsd, summary = build_text_dataset(_cfg(tmp_path, target_langs=langs, max_examples=n), progress=False)
    one = {
        lang: build_text_dataset(_cfg(tmp_path, target_lang=lang, max_examples=n), progress=False)[0] for lang in langs
    }
    recs = {r["id"]: r for r in demo_records()}
    for split in ("train", "eval"):
        rows = dsd[split].to_list()
        # the same English pairs on the same side of the split as a one-language run, each once per language
        for lang in langs:
            mine = [r for r in rows if r["target_lang"] == lang]
            assert [r["id"] for r in mine] == one[lang][split]["id"]
            assert mine == one[lang][split].to_list()
        for r in rows:
            assert (r["prompt_en"], r["response_en"]) == (recs[r["id"]]["instruction"], recs[r["id"]]["response"])
            assert r["prompt_tgt"] == recs[r["id"]][f"instruction_{r['target_lang']}"]
    assert not set(dsd["train"]["id"]) & set(dsd["eval"]["id"])  # a pair's languages all on one side
    assert summary["target_langs"] == langs and summary["target_lang"] == langs[0]
    kept = Counter(list(dsd["train"]["target_lang"]) + list(dsd["eval"]["target_lang"]))
    assert kept == summary["kept_per_language"]
    # each language gated in its own right: demo-085 (identical responses) is dropped in both when selected
    assert summary["quality"]["checked"] == 2 * summary["selected"]
    from clo_fast.data.build import select_pairs
    from clo_fast.data.sources import BadRecords

    picked = {
        p.id for p in select_pairs(_cfg(tmp_path, target_langs=langs, max_examples=n), BadRecords("error"), {})[0]
    }
    dropped = sorted((r["id"], r["target_lang"]) for r in summary["quality"]["rejects"])
    assert dropped == ([("demo-085", lang) for lang in sorted(langs)] if "demo-085" in picked else [])


class LabelTranslator:
    """An hf-like translator per language: '<lang>:' + the demo's translation when it has one."""

    def __init__(self, lang):
        self.lang, self.cache, self.stats, self.asked = lang, object(), {"backend": "hf"}, []
        src = "ko" if lang == "ko" else "sw"
        self.table = {r[k]: r[f"{k}_{src}"] for r in demo_records() for k in ("instruction", "response")}

    def translate(self, texts):
        self.asked += list(texts)
        return [self.table[t] for t in texts]

    def translate_pairs(self, pairs, src, tgt):
        assert tgt == self.lang, (tgt, self.lang)
        out = self.translate([p.instruction for p in pairs] + [p.response for p in pairs])
        return list(zip(out[: len(pairs)], out[len(pairs) :], strict=True))


def test_each_language_through_its_own_translator(tmp_path, rng):
    n = rng.randint(10, 30)
    cfg = _cfg(tmp_path, target_langs=["sw", "ko"], translator="hf", max_examples=n, eval_fraction=0.0)
    translators = {("hf", "sw"): LabelTranslator("sw"), ("hf", "ko"): LabelTranslator("ko")}
    translate_sharded(cfg, 0, 1, translator=translators, progress=False)
    dsd, summary = build_text_dataset(cfg, translator=translators, progress=False)
    assert all(t.asked for t in translators.values())
    for r in dsd["train"]:
        assert r["prompt_tgt"] == translators[("hf", r["target_lang"])].table[r["prompt_en"]]
    assert set(summary["translation"]) == {"hf:sw", "hf:ko"}


def test_a_pair_translated_into_the_wrong_language_is_dropped_in_that_language_only(tmp_path, rng):
    recs = [r for r in demo_records() if r["id"] != "demo-085" and len(r["response_ko"]) > 40]
    bad = rng.choice([r for r in recs if "`" not in r["response"]])
    rows = []
    for r in recs:
        r = dict(r)
        if r["id"] == bad["id"]:
            r["response_sw"] = r["response_ko"]  # Korean given as the Swahili answer
        rows.append(r)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    dsd, summary = build_text_dataset(_cfg(tmp_path, source=str(path), target_langs=["sw", "ko"]), progress=False)
    (reject,) = summary["quality"]["rejects"]
    assert (reject["id"], reject["target_lang"], reject["reason"]) == (bad["id"], "sw", "wrong_language")
    langs_of_bad = [r["target_lang"] for s in ("train", "eval") for r in dsd[s] if r["id"] == bad["id"]]
    assert langs_of_bad == ["ko"]


def test_evaluation_items_cover_every_language_with_one_english_item_per_prompt(tmp_path, rng):
    dsd, _ = build_text_dataset(_cfg(tmp_path, target_langs=["sw", "ko"], eval_fraction=0.2), progress=False)
    k = rng.randint(1, 10)
    items = normalize_prompts(dsd["eval"].to_list(), ["sw", "ko"], k)
    assert Counter(it["lang"] for it in items) == {"en": k, "sw": k, "ko": k}
    english = [it["id"] for it in items if it["lang"] == "en"]
    assert len(set(english)) == len(english)
    with pytest.raises(Exception, match="target_lang 'ko' not in config data.target_lang 'sw'"):
        normalize_prompts(dsd["eval"].to_list(), "sw")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.target_langs=[sw, sw]"], "data.target_langs: has repeats"),
        (["data.target_langs=[sw, en]"], "data.target_langs: lists the source language"),
        (["data.target_langs=[sw, xx]"], "data.target_langs: unknown language code 'xx'"),
        (["data.target_langs=[sw, yo]"], "data.target_langs: the bundled demo data has translations for ko, sw only"),
        (["data.target_langs=[ko, sw]", "data.target_lang=sw"], r"data.target_langs: is \['ko', 'sw'\] but data.targ"),
    ],
)
def test_bad_language_lists_stop_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_target_langs_set_the_runs_first_language():
    cfg = load_config(None, ["data.target_langs=[SW, ko]"])
    assert cfg.data.target_langs == ["sw", "ko"] and cfg.data.target_lang == "sw"
