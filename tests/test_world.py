"""The miniature fact world's text (clo_fast/data/world.py): what each entity group is in, that held-out facts
appear only in English pretraining text, the answer scoring, and that the data builder reads it as a source."""

from __future__ import annotations

import pytest

from clo_fast.data import world


@pytest.fixture(scope="module")
def entities():
    return world.build_entities()


def test_groups_and_where_the_held_out_facts_appear(entities):
    assert len(entities) == world.WORLD["entities"] == len({e["name"] for e in entities})
    docs = world.pretraining_documents(entities)
    pairs = world.finetune_pairs(entities)
    names = {e["name"] for e in entities}

    def mentions(texts, among):
        return {n for t in texts for n in among if n in t.replace("?", " ").replace(".", " ").split()}

    seen = set()
    for items in (world.validation_items(entities), world.test_items(entities)):
        part_of = {it["entity"]: it["part"] for it in items}
        known = {n for n, p in part_of.items() if p == "known"}
        transfer = {n for n, p in part_of.items() if p == "transfer"}
        assert len(known) == len(transfer) == 30 and not (known | transfer) & seen  # the splits share no entity
        seen |= known | transfer
        # every held-out entity is in the English facts; none in Q&A or fine-tuning; only `known` ones in Swahili
        assert mentions(docs["facts"], known | transfer) == known | transfer
        assert not mentions(docs["qa"], known | transfer)
        assert not mentions([p[k] for p in pairs for k in p if k != "id"], known | transfer)
        assert mentions(docs["swahili"], known | transfer) == known
        assert len([it for it in items if it["lang"] == "en"]) == len([it for it in items if it["lang"] == "sw"])
        assert len(items) == 2 * 4 * 60
        # the first 60 questions per language (the small version's) hold both parts
        assert {it["part"] for it in items[:60]} == {"known", "transfer"}
        facts = " ".join(docs["facts"])
        assert all(it["reference"] in facts for it in items if it["lang"] == "en")
    # most non-held-out entities have Swahili sentences; fine-tuning covers entities with and without them
    rest = names - seen
    assert len(mentions(docs["swahili"], rest)) > len(rest) / 2
    tuned = mentions([p["instruction"] for p in pairs], rest)
    assert 0 < len(tuned & mentions(docs["swahili"], rest)) < len(tuned)
    # Swahili appears only as plain text, never after the instruction template
    assert all(world.TEMPLATE.split("{")[0] not in t for t in docs["swahili"])
    with pytest.raises(ValueError, match="held-out split"):
        world.held_out_items(entities, "train")


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
    n = world.named_value
    assert n("Rangi ambayo Zuvax anaipenda zaidi ni nyekundu.", "color", "sw") == "red"
    assert n("The color that Zuvax likes the most is red.", "color", "sw") is None  # named, not in the language
    assert n("The color that Zuvax likes the most is blue.", "color", "en") == "blue"  # what it said, right or not
    assert n("red or blue", "color", "en") is None and n("", "color", "en") is None


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
