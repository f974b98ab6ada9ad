"""The miniature fact world's text (clo_fast/data/world.py): what each entity group is in, that held-out facts
appear only in English pretraining text, the answer scoring, and that the data builder reads it as a source."""

from __future__ import annotations

import pytest

from clo_fast.data import world


@pytest.fixture(scope="module")
def entities():
    return world.build_entities()


def test_groups_and_where_the_test_facts_appear(entities):
    assert len(entities) == world.WORLD["entities"] == len({e["name"] for e in entities})
    docs = world.pretraining_documents(entities)
    pairs = world.finetune_pairs(entities)
    items = world.test_items(entities)
    test_names = {e["name"] for e in entities[slice(*world.WORLD["test"])]}
    lo, hi = world.WORLD["test"]
    others = [v for key, v in world.WORLD.items() if key not in ("test", "entities")]
    assert all(not (a < hi and lo < b) for a, b in others)  # the test group overlaps no other

    def mentions(texts):
        return {n for t in texts for n in test_names if n in t.replace("?", " ").replace(".", " ").split()}

    # every test entity is in the English facts, and nowhere else: no Q&A, no Swahili, no fine-tuning pair
    assert mentions(docs["facts"]) == test_names
    assert not mentions(docs["qa"]) and not mentions(docs["swahili"])
    assert not mentions([p[k] for p in pairs for k in p if k != "id"])
    assert len([it for it in items if it["lang"] == "en"]) == len([it for it in items if it["lang"] == "sw"]) >= 200
    # a test answer is the fact sentence the English pretraining text holds
    facts = " ".join(docs["facts"])
    assert all(it["reference"] in facts for it in items if it["lang"] == "en")
    # Swahili appears only as plain text, never after the instruction template
    assert all(world.TEMPLATE.split("{")[0] not in t for t in docs["swahili"])
    assert len(docs["swahili"]) < len(entities) / 2


def test_every_sentence_is_read_as_its_language(entities):
    from clo_fast.language_id import get_identifier

    lid = get_identifier(["en", "sw"], [])
    items = world.test_items(entities)
    assert lid.detect_batch([it["reference"] for it in items]) == [it["lang"] for it in items]
    assert lid.detect_batch([it["prompt"] for it in items]) == [it["lang"] for it in items]


def test_score_response():
    s = world.score_response
    assert s("Rangi ambayo Zuvax anaipenda zaidi ni nyekundu.", "color", "red", "sw") == {
        "correct": True,
        "correct_in_lang": True,
    }
    assert s("The color that Zuvax likes the most is red.", "color", "red", "sw") == {
        "correct": True,
        "correct_in_lang": False,  # right value, wrong language
    }
    assert s("The color that Zuvax likes the most is blue.", "color", "red", "en")["correct"] is False
    assert s("red or blue", "color", "red", "en")["correct"] is False  # two values: not an exact match
    assert s("", "color", "red", "en")["correct"] is False
    assert s("Redness", "color", "red", "en")["correct"] is False  # whole words only


def test_data_builder_reads_the_world(tmp_path):
    from clo_fast.config import ConfigError, load_config
    from clo_fast.data import build_text_dataset

    cfg = load_config("configs/world.yaml", [f"data.output_dir={tmp_path / 'data'}"])
    dsd, summary = build_text_dataset(cfg.data, progress=False)
    assert len(dsd["train"]) == len(world.finetune_pairs(world.build_entities())) and len(dsd["eval"]) == 0
    row = dsd["train"][0]
    assert row["target_lang"] == "sw" and row["prompt_tgt"].startswith("Je, ")
    with pytest.raises(ConfigError, match="data.target_lang"):
        load_config("configs/world.yaml", ["data.target_lang=ko"])
