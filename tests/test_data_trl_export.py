"""clo_fast.data.trl_export: the pairs as TRL's preference and SFT datasets, read back with load_from_disk and
prepared by TRL's own DPOTrainer / SFTTrainer dataset preparation into the same tokens clo-fast trains on."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
from helpers import data_config

from clo_fast.constants import IGNORE_INDEX
from clo_fast.data import build_text_dataset, tokenize_dataset
from clo_fast.data.cli import main as data_main
from clo_fast.data.trl_export import export_trl


def _trl_prepared(split, tok, tmp_path):
    """TRL's DPOTrainer._prepare_dataset (prompt extraction, EOS, tokenization, the checks) on one split; it reads
    only the tokenizer from the trainer, so no model is built."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, bf16=False, use_cpu=True)
    return DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), split, tok, args, "train")


def _ours(tokenized):
    """(prompt ids, response ids) of the four sequences of every example, from our labels."""
    out = []
    for ids4, lab4 in zip(tokenized["input_ids"], tokenized["labels"], strict=True):
        n = [sum(1 for t in lab if t == IGNORE_INDEX) for lab in lab4]
        out.append([(ids[:k], ids[k:]) for ids, k in zip(ids4, n, strict=True)])
    return out


def _export(tmp_path, tok, **cfg_fields):
    cfg = data_config(tmp_path, max_examples=8, eval_fraction=0.25, max_length=1024, **cfg_fields)
    dsd = build_text_dataset(cfg, progress=False)[0]
    out = export_trl(dsd, tok, cfg, tmp_path / "trl_export")
    return cfg, dsd, out


def test_the_preference_export_tokenizes_in_trl_to_our_sequences(tmp_path, demo_tokenizer):
    """Plain template (TRL's standard format): every direction's prompt, chosen and rejected tokens from TRL's
    preparation equal the prompt and response tokens of our sequences 0/1 (English prompt) and 2/3 (target)."""
    tok = demo_tokenizer
    cfg, dsd, out = _export(tmp_path, tok)
    pref = datasets.load_from_disk(str(out / "preference"))
    assert set(pref) == {"train", "eval"} and len(pref["train"]) == 2 * len(dsd["train"])
    prepared = _trl_prepared(pref["train"], tok, tmp_path)
    ours = _ours(tokenize_dataset(dsd["train"], tok, cfg, use_cache=False))
    for i, seqs in enumerate(ours):
        for row, (chosen, rejected) in ((prepared[2 * i], (0, 1)), (prepared[2 * i + 1], (2, 3))):
            assert row["prompt_ids"] == seqs[chosen][0] == seqs[rejected][0]
            assert row["chosen_ids"] == seqs[chosen][1] and row["rejected_ids"] == seqs[rejected][1]
    assert [r["direction"] for r in pref["train"]][:2] == [cfg.source_lang, cfg.target_lang]


def test_the_sft_export_tokenizes_in_trl_to_our_sft_sequences(tmp_path, demo_tokenizer):
    """TRL's SFTTrainer._prepare_dataset on the prompt/completion rows: the English row gives our sequence 0 and the
    target row our sequence 2, its completion mask our labelled (response) tokens."""
    from trl import SFTConfig, SFTTrainer

    tok = demo_tokenizer
    cfg, dsd, out = _export(tmp_path, tok)
    sft = datasets.load_from_disk(str(out / "sft"))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, bf16=False, use_cpu=True)
    stub = SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=None)
    prepared = SFTTrainer._prepare_dataset(stub, sft["train"], tok, args, False, None, "train")
    ours = tokenize_dataset(dsd["train"], tok, cfg, use_cache=False)
    for i, ex in enumerate(ours):
        for row, k in ((prepared[2 * i], 0), (prepared[2 * i + 1], 2)):
            assert row["input_ids"] == ex["input_ids"][k]
            assert row["completion_mask"] == [int(t != IGNORE_INDEX) for t in ex["labels"][k]]
    row_en, row_tgt = sft["train"][0], sft["train"][1]
    ex = dsd["train"][0]
    assert (row_en["lang"], row_tgt["lang"]) == (cfg.source_lang, cfg.target_lang)
    assert row_en["completion"] == ex["response_en"] and row_tgt["completion"] == ex["response_tgt"]
    assert ex["prompt_tgt"] in row_tgt["prompt"] and row_tgt["prompt"].endswith("### Response:\n")


def test_chat_template_exports_conversations_that_trl_renders_to_our_prompts(tmp_path, chatml_tok):
    """template: chat → TRL's conversational format; TRL applies the chat template itself and gets our prompt
    tokens (system prompt per language included) and our response tokens up to the end-of-turn token."""
    tok = chatml_tok
    cfg, dsd, out = _export(tmp_path, tok, template="chat")
    cfg.system_prompts = {}
    pref = datasets.load_from_disk(str(out / "preference"))
    assert pref["train"][0]["chosen"][0]["role"] == "assistant"
    prepared = _trl_prepared(pref["train"], tok, tmp_path)
    ours = _ours(tokenize_dataset(dsd["train"], tok, cfg, use_cache=False))
    for i, seqs in enumerate(ours):
        for row, (chosen, rejected) in ((prepared[2 * i], (0, 1)), (prepared[2 * i + 1], (2, 3))):
            assert row["prompt_ids"] == seqs[chosen][0]
            for got, (_, want) in ((row["chosen_ids"], seqs[chosen]), (row["rejected_ids"], seqs[rejected])):
                assert got[: len(want)] == want  # the template may add a newline after its end-of-turn token


def test_the_data_command_writes_the_export_and_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    sets = [f"data.output_dir={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}", "data.max_examples=6"]
    argv = ["--config", "demo", "--no-tokenize", "--no-progress", *(a for s in sets for a in ("--set", s))]
    assert data_main([*argv, "--export-format", "trl"]) == 0
    assert f"{tmp_path / 'data_trl'}/preference" in capsys.readouterr().out
    assert len(datasets.load_from_disk(str(tmp_path / "data_trl" / "sft"))["train"]) > 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert data_main([*argv, "--export-format", "trl", "--export-dir", str(mine)]) == 2
    assert "--export-dir" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("export_dir", ["data/inner", None])
def test_export_dir_inside_the_dataset_or_without_a_format_is_refused(tmp_path, capsys, export_dir):
    argv = ["--config", "demo", "--no-tokenize", "--set", f"data.output_dir={tmp_path / 'data'}"]
    extra = (
        ["--export-format", "trl", "--export-dir", str(tmp_path / export_dir)] if export_dir else ["--export-dir", "x"]
    )
    assert data_main([*argv, *extra]) == 2
    assert "--export-dir" in capsys.readouterr().err
