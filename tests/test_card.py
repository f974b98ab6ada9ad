"""The model card (clo_fast.training.card) as a Hub user expects it: Hub names only in the metadata, nothing local,
the method with λ/β and the paper, data with pair counts, training settings, the evaluation table, a short sorted
metrics table, versions, usage, license and citation; the adapter's card says it is an adapter."""

from __future__ import annotations

import re

import pytest
import yaml

from clo_fast.config import load_config
from clo_fast.training.card import PAPER_URL, add_evaluation_to_card, model_card_text, write_model_card

FINAL = {  # what a run's last step logs: many raw values, in logging order
    "loss": 0.61,
    "nll": 1.25,
    "cl_loss": 0.5,
    "rewards/accuracies": 0.75,
    "logps/chosen": -31.0,
    "en/rewards/accuracies": 0.7,
    "grad_norm": 2.5,
    "learning_rate": 1e-5,
    "tokens/s": 1234.0,
    "eval/loss": 0.7,
    "eval/rewards/accuracies": 0.625,
    "fidelity/sw": 0.9,
    "fidelity/en": 1.0,
    "samples/sw": "text",
}


def _summary(base):
    return {
        "steps": 40,
        "world_size": 2,
        "base_model": str(base),
        "global_batch": 8,
        "data": {"train_examples": 120, "eval_examples": 7},
        "final_metrics": FINAL,
    }


def _metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_a_local_base_model_and_data_file_leave_no_path_in_the_card(tmp_path):
    base, data = tmp_path / "models" / "my-base", tmp_path / "private" / "pairs.jsonl"
    base.mkdir(parents=True)
    data.parent.mkdir()
    data.write_text("")
    cfg = load_config(
        None, [f"model.name_or_path={base}", f"data.source={data}", f"train.output_dir={tmp_path / 'out' / 'run'}"]
    )
    card = model_card_text(cfg, _summary(base))
    assert str(tmp_path) not in card and "/private/" not in card
    meta = _metadata(card)
    assert "datasets" not in meta and "base_model" not in meta
    assert "pairs.jsonl (a local file or folder)" in card and "my-base (a local file or folder)" in card


def test_hub_names_go_into_the_metadata():
    cfg = load_config(
        None,
        ["model.name_or_path=Qwen/Qwen2.5-3B", "data.source=OpenAssistant/oasst1", "data.source_format=oasst"]
        + ["data.translator=hf", "data.target_lang=sw", "train.hub_license=apache-2.0", "train.push_to_hub=me/clo-sw"],
    )
    card = model_card_text(cfg, _summary("Qwen/Qwen2.5-3B"))
    meta = _metadata(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-3B" and meta["datasets"] == ["OpenAssistant/oasst1"]
    assert (
        meta["language"] == ["en", "sw"] and meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    )
    assert meta["pipeline_tag"] == "text-generation"
    assert 'AutoModelForCausalLM.from_pretrained("me/clo-sw")' in card


def test_the_card_has_what_a_hub_user_looks_for(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "clo.beta=0.2", "clo.lam=0.3"])
    card = model_card_text(
        cfg, _summary("demo"), "| metric | base | trained |\n|---|---:|---:|\n| fidelity sw | 0.1 | 0.8 |"
    )
    sections = re.findall(r"^## (.+)$", card, flags=re.M)
    assert sections == [
        "Method",
        "Data",
        "Training",
        "Evaluation: base vs trained",
        "Final training metrics",
        "Versions",
        "Usage",
        "License",
        "Citation",
    ]
    assert "λ = 0.3, β = 0.2" in card and PAPER_URL in card
    assert "120 for training, 7 held out" in card
    for row in ("| global batch | 8 examples |", "| steps | 40 |", "| seed | 0 |", "| world size | 2 |"):
        assert row in card, row
    assert (
        "| learning rate | 5e-05 (AdamW" in card and "| schedule | cosine" in card and "| precision | float32 |" in card
    )
    assert "| fidelity sw | 0.1 | 0.8 |" in card
    assert re.search(r"\| torch \| \d", card) and re.search(r"\| transformers \| \d", card)
    assert "@inproceedings{" in card and "Cross-Lingual Optimization for Language Transfer" in card
    assert "the base model's license applies" in card and _metadata(card)["license"] == "other"


def test_final_metrics_are_a_short_sorted_table():
    card = model_card_text(load_config(None), _summary("demo"))
    table = card.split("## Final training metrics")[1].split("##")[0]
    names = re.findall(r"^\| ([a-z][^|]*?) \| [-\d.e]+ \|$", table, flags=re.M)
    assert (
        names
        == sorted(names)
        == [
            "cl_loss",
            "eval/loss",
            "eval/rewards/accuracies",
            "fidelity/en",
            "fidelity/sw",
            "loss",
            "nll",
            "rewards/accuracies",
        ]
    )
    assert "| loss | 0.61 |" in table


@pytest.mark.parametrize("pushed", [True, False])
def test_the_adapter_card_says_it_is_an_adapter(tmp_path, pushed):
    sets = [f"train.output_dir={tmp_path / 'run'}", "model.lora={r: 4}"] + (
        ["train.push_to_hub=me/clo"] if pushed else []
    )
    cfg = load_config(None, sets)
    adapter = model_card_text(cfg, _summary("demo"), library="peft")
    merged = model_card_text(cfg, _summary("demo"))
    assert "**A LoRA adapter** (PEFT), not a full model" in adapter and "merged into these weights" not in adapter
    assert "PeftModel.from_pretrained(base, " in adapter and _metadata(adapter)["library_name"] == "peft"
    assert "merged into these weights" in merged and "A LoRA adapter" not in merged
    if pushed:
        assert 'PeftModel.from_pretrained(base, "me/clo-adapter")' in adapter and "`me/clo`" in adapter


def test_the_evaluation_table_reaches_both_cards(tmp_path):
    import json

    from clo_fast.training.card import SUMMARY_FILE

    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "model.lora={r: 4}"])
    model_dir, adapter_dir = tmp_path / "run" / "hf_model", tmp_path / "run" / "hf_adapter"
    for d in (model_dir, adapter_dir):
        d.mkdir(parents=True)
    (model_dir / SUMMARY_FILE).write_text(json.dumps(_summary("demo")))
    write_model_card(model_dir, cfg, _summary("demo"))
    write_model_card(adapter_dir, cfg, _summary("demo"), library="peft")
    add_evaluation_to_card(model_dir, cfg, "| metric | base | trained |\n|---|---:|---:|\n| fidelity sw | 0.1 | 0.8 |")
    for d in (model_dir, adapter_dir):
        assert "| fidelity sw | 0.1 | 0.8 |" in (d / "README.md").read_text(), d
    assert "A LoRA adapter" in (adapter_dir / "README.md").read_text()


def test_a_mix_of_datasets_and_several_languages_are_all_named():
    """data.sources and data.target_langs: every dataset (a Hub one in the metadata too), its translator, and every
    target language reach the card."""
    cfg = load_config(
        None,
        [
            "data.target_langs=[sw, ko]",
            "data.sources=[{source: demo, max_examples: 50}, {source: org/replay, translator: hf, max_examples: 20}]",
        ],
    )
    text = model_card_text(cfg, {"data": {"train_examples": 10, "eval_examples": 2}})
    head = text.split("---")[1]
    assert "- sw" in head and "- ko" in head and "org/replay" in head and "datasets:" in head
    assert "fine-tuned for **sw, ko**" in text
    assert "- source: `demo` (pairs), en → sw, ko; translations: given in the data" in text
    assert "- source: `org/replay` (pairs), en → sw, ko; translations: machine-translated with" in text
