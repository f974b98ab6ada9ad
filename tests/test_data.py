"""Dataset builder: sources, selection, the four CLO sequences, truncation, collation, bad input."""

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from clo_fast.config import ConfigError, DataConfig, QualitySettings
from clo_fast.data import (
    SEQUENCE_KINDS,
    TEXT_COLUMNS,
    DataError,
    build_text_dataset,
    collate_clo,
    demo_data_path,
    format_prompt,
    load_or_build_text_dataset,
    save_text_dataset,
    tokenize_dataset,
)
from clo_fast.data.cli import main

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _demo_rows():
    return [json.loads(line) for line in demo_data_path().read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tok(demo_tokenizer):
    """The session's tiny demo tokenizer (tests/conftest.py): trained on the demo texts, adds BOS like Llama."""
    return demo_tokenizer


# the toy translations here are copies of the source by design ("[sw] Hi", "x"): the quality gate, on by default
# and tested in tests/test_data_quality.py, would drop them
NO_GATE = QualitySettings(enabled=False)


def _cfg(tmp_path, **kw):
    kw.setdefault("quality", NO_GATE)
    return DataConfig(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), **kw)


def _enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------- demo / columns
@pytest.mark.parametrize("lang", ["ko", "sw"])
def test_demo_columns_build(tmp_path, lang):
    rows = {r["id"]: r for r in _demo_rows()}
    assert 120 <= len(rows) <= 160
    dsd, summary = build_text_dataset(_cfg(tmp_path, target_lang=lang, eval_fraction=0.1), progress=False)
    assert set(dsd) == {"train", "eval"} and list(dsd["train"].column_names) == list(TEXT_COLUMNS)
    assert len(dsd["train"]) + len(dsd["eval"]) == len(rows) == summary["kept"] == summary["records_read"]
    assert len(dsd["eval"]) == round(0.1 * len(rows))
    assert not set(dsd["train"]["id"]) & set(dsd["eval"]["id"])
    for ex in dsd["train"]:
        r = rows[ex["id"]]
        assert (ex["prompt_en"], ex["response_en"]) == (r["instruction"], r["response"])
        assert (ex["prompt_tgt"], ex["response_tgt"]) == (r[f"instruction_{lang}"], r[f"response_{lang}"])
        assert ex["target_lang"] == lang
    assert summary["translation"] == {"backend": "columns"}


def test_demo_data_has_both_languages_and_card():
    rows = _demo_rows()
    for r in rows:
        for k in ("instruction", "response", "instruction_ko", "response_ko", "instruction_sw", "response_sw"):
            assert isinstance(r[k], str) and r[k].strip(), (r["id"], k)
        assert any("\uac00" <= c <= "\ud7a3" for c in r["instruction_ko"]), r["id"]  # Hangul present
    card = demo_data_path().parent.joinpath("DATA_CARD.md").read_text()
    assert "Apache-2.0" in card and "written for" in card


def test_demo_rejects_language_without_columns(tmp_path):
    with pytest.raises(ConfigError, match="data.target_lang: the bundled demo data has translations for ko, sw"):
        build_text_dataset(_cfg(tmp_path, target_lang="de"), progress=False)


def test_seeded_selection(tmp_path):
    def ids(seed, n):
        dsd, _ = build_text_dataset(_cfg(tmp_path, max_examples=n, seed=seed, eval_fraction=0.0), progress=False)
        return dsd["train"]["id"]

    a, b, c = ids(1, 10), ids(1, 10), ids(2, 10)
    assert a == b and a != c and len(a) == 10 == len(set(a))
    assert set(a) <= {r["id"] for r in _demo_rows()}


def test_save_and_load_or_build(tmp_path):
    cfg = _cfg(tmp_path, max_examples=8)
    dsd, summary = load_or_build_text_dataset(cfg, progress=False)
    assert (tmp_path / "out" / "summary.json").is_file() and (tmp_path / "out" / "dataset_dict.json").is_file()
    dsd2, summary2 = load_or_build_text_dataset(cfg, progress=False)  # loaded from disk
    assert dsd2["train"]["id"] == dsd["train"]["id"] and summary2 == json.loads(json.dumps(summary))
    cfg.max_examples = 9  # another config: rebuilt
    dsd3, _ = load_or_build_text_dataset(cfg, progress=False)
    assert len(dsd3["train"]) + len(dsd3["eval"]) == 9


# ------------------------------------------------------------------------------- sequences and labels
def test_sequence_order_and_label_masks(tmp_path, tok):
    cfg = _cfg(tmp_path, max_length=512)
    dsd, _ = build_text_dataset(cfg, progress=False)
    ds = dsd["train"]
    stats = {}
    out = tokenize_dataset(ds, tok, cfg, stats=stats)
    assert len(out) == len(ds) and stats["dropped"] == {"prompt_too_long": 0}
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for i in range(len(ds)):
        ex, t = ds[i], out[i]
        assert t["id"] == ex["id"]
        pe = [bos] + _enc(tok, "### Instruction:\n" + ex["prompt_en"] + "\n\n### Response:\n")
        pt = [bos] + _enc(tok, "### Instruction:\n" + ex["prompt_tgt"] + "\n\n### Response:\n")
        re_, rt = _enc(tok, ex["response_en"]) + [eos], _enc(tok, ex["response_tgt"]) + [eos]
        expected = [(pe, re_), (pe, rt), (pt, rt), (pt, re_)]  # docs/DESIGN.md §1 order
        assert len(t["input_ids"]) == len(t["labels"]) == 4
        for k, (p, r) in enumerate(expected):
            assert t["input_ids"][k] == p + r, (i, SEQUENCE_KINDS[k])
            assert t["labels"][k] == [-100] * len(p) + r
    # the four sequences really differ by language where they should
    t0 = out[0]
    assert t0["labels"][0][-1] == eos and t0["labels"][2][-1] == eos
    # response part of seq 0 == response part of seq 3 (same y_en), seq 1 == seq 2 (same y_tgt)
    resp = [[x for x in lab if x != -100] for lab in t0["labels"]]
    assert resp[0] == resp[3] and resp[1] == resp[2] and resp[0] != resp[1]


def test_truncation_keeps_prompt_cuts_response_and_drops_long_prompts(tmp_path, tok):
    L = 48
    cfg = _cfg(tmp_path, max_length=L)
    dsd, _ = build_text_dataset(cfg, progress=False)
    ds = dsd["train"]
    stats = {}
    out = tokenize_dataset(ds, tok, cfg, stats=stats)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    kept, dropped, truncated = [], 0, [0] * 4
    for ex in ds:
        pe = [bos] + _enc(tok, cfg.prompt_template.replace("{instruction}", ex["prompt_en"]))
        pt = [bos] + _enc(tok, cfg.prompt_template.replace("{instruction}", ex["prompt_tgt"]))
        if max(len(pe), len(pt)) >= L:
            dropped += 1
            continue
        re_, rt = _enc(tok, ex["response_en"]) + [eos], _enc(tok, ex["response_tgt"]) + [eos]
        seqs = [(pe, re_), (pe, rt), (pt, rt), (pt, re_)]
        kept.append((ex["id"], seqs))
        for k, (p, r) in enumerate(seqs):
            truncated[k] += len(p) + len(r) > L
    assert dropped > 0 and sum(truncated) > 0  # the setting exercises both paths
    assert stats["dropped"]["prompt_too_long"] == dropped and len(out) == len(kept)
    assert list(stats["truncated"].values()) == truncated
    for (ex_id, seqs), t in zip(kept, out, strict=False):
        assert t["id"] == ex_id
        for k, (p, r) in enumerate(seqs):
            ids, lab = t["input_ids"][k], t["labels"][k]
            assert len(ids) == min(L, len(p) + len(r))
            assert ids[: len(p)] == p  # the prompt is whole
            assert lab[: len(p)] == [-100] * len(p) and lab[len(p) :] == r[: L - len(p)]
            if len(p) + len(r) > L:
                assert ids[-1] != eos or r[L - len(p) - 1] == eos  # the end (EOS) was cut
    assert stats["token_lengths"]["en_en"]["max"] <= L


def test_chat_template(tmp_path, tok):
    cfg = _cfg(tmp_path, template="chat", max_examples=5)
    dsd, _ = build_text_dataset(cfg, progress=False)
    ex = dsd["train"][0]
    p = format_prompt(ex["prompt_tgt"], tok, cfg)
    assert p == f"<|user|>\n{ex['prompt_tgt']}\n<|assistant|>\n"
    out = tokenize_dataset(dsd["train"], tok, cfg)
    pe = _enc(tok, format_prompt(ex["prompt_en"], tok, cfg))  # no BOS added: the template owns the start
    assert out[0]["input_ids"][0][: len(pe)] == pe and out[0]["labels"][0][: len(pe)] == [-100] * len(pe)
    tok2 = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    with pytest.raises(ConfigError, match="has no chat template"):
        format_prompt("hi", tok2, cfg)


def test_tokenization_is_cached(tmp_path, tok):
    cfg = _cfg(tmp_path, max_examples=12, max_length=64)
    dsd, _ = build_text_dataset(cfg, progress=False)
    s1, s2 = {}, {}
    a = tokenize_dataset(dsd["train"], tok, cfg, stats=s1)
    b = tokenize_dataset(dsd["train"], tok, cfg, stats=s2)
    assert s1["cache_hit"] is False and s2["cache_hit"] is True
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    cfg.max_length = 65
    s3 = {}
    tokenize_dataset(dsd["train"], tok, cfg, stats=s3)
    assert s3["cache_hit"] is False


# ------------------------------------------------------------------------------------------ collate
def test_collate_clo_shapes_shift_and_padding():
    exs = [
        {
            "input_ids": [[1, 2, 3, 4], [1, 2, 5], [6, 7, 8, 9, 10], [6, 7, 3]],
            "labels": [[-100, -100, 3, 4], [-100, -100, 5], [-100, -100, -100, 9, 10], [-100, -100, 3]],
            "ref_logps": [-1.0, -2.0, -3.0, -4.0],
        },
        {
            "input_ids": [[1, 3], [1, 4], [2, 3], [2, 4]],
            "labels": [[-100, 3], [-100, 4], [-100, 3], [-100, 4]],
            "ref_logps": [0.5, 0.25, 0.0, -1.0],
        },
    ]
    b = collate_clo(exs, pad_token_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (8, 8) and b["input_ids"].dtype == torch.long
    assert b["input_ids"][2].tolist() == [6, 7, 8, 9, 10, 0, 0, 0]
    assert b["attention_mask"][2].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert b["labels"][2].tolist() == [-100, -100, 9, 10, -100, -100, -100, -100]  # shifted left by one
    assert b["labels"][0].tolist() == [-100, 3, 4, -100, -100, -100, -100, -100]
    assert b["labels"][4].tolist() == [3] + [-100] * 7  # row 4 = example 1, sequence 0
    assert b["response_tokens"].tolist() == [[2, 1, 2, 1], [1, 1, 1, 1]]
    assert b["ref_logps"].dtype == torch.float32 and b["ref_logps"].shape == (2, 4)
    b2 = collate_clo([{k: v for k, v in exs[1].items() if k != "ref_logps"}], pad_token_id=9, pad_to_multiple_of=64)
    assert b2["input_ids"].shape == (4, 64) and "ref_logps" not in b2 and b2["input_ids"][0, 2] == 9


def test_collate_on_tokenized_demo(tmp_path, tok):
    cfg = _cfg(tmp_path, max_examples=4, max_length=96, eval_fraction=0.0)
    dsd, _ = build_text_dataset(cfg, progress=False)
    ds = tokenize_dataset(dsd["train"], tok, cfg)
    b = collate_clo([ds[i] for i in range(4)], tok.pad_token_id)
    assert b["input_ids"].shape[0] == 16 and b["input_ids"].shape[1] % 64 == 0
    for r in range(16):
        ex, k = ds[r // 4], r % 4
        n_resp = sum(x != -100 for x in ex["labels"][k])
        assert b["response_tokens"][r // 4, k] == n_resp == (b["labels"][r] != -100).sum()
        ids = b["input_ids"][r]
        for t in torch.nonzero(b["labels"][r] != -100).flatten().tolist():
            assert b["labels"][r, t] == ids[t + 1]


# ------------------------------------------------------------------------------------------ sources
RECS = [
    {"q": "What is two plus two?", "a": "Four."},
    {"q": "Name a colour.", "a": "Blue."},
    {"q": "Say hello.", "a": "Hello!"},
]


def _cols(recs):
    return [dict(r, q_sw=r["q"] + " (sw)", a_sw=r["a"] + " (sw)") for r in recs]


def _fields(**kw):
    return dict(
        instruction_field="q",
        response_field="a",
        target_lang="sw",
        target_instruction_field="q_{lang}",
        target_response_field="a_{lang}",
        eval_fraction=0.0,
        **kw,
    )


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "folder"])
def test_local_sources(tmp_path, fmt):
    recs = _cols(RECS)
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": recs}))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(recs), path)
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(recs[0]))
            w.writeheader()
            w.writerows(recs)
    else:  # a folder of data files: read by datasets.load_dataset, like a hub dataset
        path = tmp_path / "folder"
        path.mkdir()
        (path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    dsd, summary = build_text_dataset(_cfg(tmp_path, source=str(path), **_fields()), progress=False)
    got = sorted(
        zip(dsd["train"]["prompt_en"], dsd["train"]["response_en"], dsd["train"]["response_tgt"], strict=False)
    )
    assert got == sorted((r["q"], r["a"], r["a_sw"]) for r in recs)
    assert summary["records_read"] == 3


def test_hub_dataset_name_goes_to_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(_cols(RECS))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = _cfg(tmp_path, source="someorg/some-sft", source_config="main", split="train_sft", **_fields())
    dsd, _ = build_text_dataset(cfg, progress=False)
    assert calls == [("someorg/some-sft", "main", "train_sft")] and len(dsd["train"]) == 3
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("nope")))
    with pytest.raises(DataError, match="dataset 'someorg/some-sft' .*cannot load"):
        build_text_dataset(cfg, progress=False)


def _oasst_flat():
    m = []

    def add(mid, parent, role, text, lang="en", rank=None, **kw):
        m.append(
            {
                "message_id": mid,
                "parent_id": parent,
                "role": role,
                "text": text,
                "lang": lang,
                "rank": rank,
                "message_tree_id": kw.pop("tree", "t"),
                "deleted": kw.pop("deleted", False),
                "review_result": True,
            }
        )

    add("r1", None, "prompter", "How do I bake bread?")
    add("a1", "r1", "assistant", "Second-best answer.", rank=1)
    add("a2", "r1", "assistant", "Mix flour, water, yeast and salt, then bake.", rank=0)
    add("a3", "r1", "assistant", "Deleted answer.", rank=None, deleted=True)
    add("p1", "a2", "prompter", "Thanks! How long?")  # second turn: ignored (single turn)
    add("a4", "p1", "assistant", "About 40 minutes.", rank=0)
    add("r2", None, "prompter", "Wie backe ich Brot?", lang="de")
    add("b1", "r2", "assistant", "Mehl und Wasser.", lang="de", rank=0)
    add("r3", None, "prompter", "Unranked question?")
    add("c1", "r3", "assistant", "Unranked reply.")
    add("r4", None, "prompter", "What is 3 + 4?")
    add("d1", "r4", "assistant", "7", rank=0.0)
    return m


def test_oasst_flat_message_table(tmp_path):
    path = tmp_path / "oasst.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _oasst_flat()))
    cfg = _cfg(tmp_path, source=str(path), source_format="oasst", translator="hf", eval_fraction=0.0)
    from clo_fast.data.sources import BadRecords, read_pairs

    filtered = {}
    pairs, n = read_pairs(cfg, BadRecords("error"), filtered)
    assert n == 12
    assert sorted((p.id, p.instruction, p.response) for p in pairs) == [
        ("r1", "How do I bake bread?", "Mix flour, water, yeast and salt, then bake."),
        ("r4", "What is 3 + 4?", "7"),
    ]
    assert filtered == {"oasst_other_language": 1, "oasst_no_ranked_reply": 1}


def test_oasst_nested_trees(tmp_path):
    trees = [
        {
            "message_tree_id": "t1",
            "prompt": {
                "message_id": "r1",
                "role": "prompter",
                "lang": "en",
                "text": "Hi there?",
                "replies": [
                    {"role": "assistant", "rank": 1, "text": "B"},
                    {"role": "assistant", "rank": 0, "text": "A", "replies": []},
                ],
            },
        },
        {
            "message_tree_id": "t2",
            "prompt": {
                "message_id": "r2",
                "role": "prompter",
                "lang": "es",
                "text": "Hola?",
                "replies": [{"role": "assistant", "rank": 0, "text": "Hola"}],
            },
        },
    ]
    path = tmp_path / "trees.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in trees))
    from clo_fast.data import read_pairs

    pairs, _ = read_pairs(_cfg(tmp_path, source=str(path), source_format="oasst", translator="hf"))
    assert [(p.id, p.instruction, p.response) for p in pairs] == [("r1", "Hi there?", "A")]


def test_oasst_with_columns_translator_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="oasst data carries no translations"):
        build_text_dataset(_cfg(tmp_path, source="x.jsonl", source_format="oasst"), progress=False)


# -------------------------------------------------------------------------------------- bad input
def _write_jsonl(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps(_cols(RECS)[0])


@pytest.mark.parametrize(
    "line,pattern,reason",
    [
        ('{"q": "Hi", "a": "Ok", "q_sw": "x"}', r"bad.jsonl: line 2: field 'a_sw': missing", "missing_field"),
        ('{"a": "Ok", "q_sw": "x", "a_sw": "y"}', r"bad.jsonl: line 2: field 'q': missing", "missing_field"),
        (
            '{"q": 5, "a": "Ok", "q_sw": "x", "a_sw": "y"}',
            r"bad.jsonl: line 2: field 'q': expected a string, got int",
            "non_string_field",
        ),
        ('{"q": "Hi", "a": "", "q_sw": "x", "a_sw": "y"}', r"bad.jsonl: line 2: field 'a': empty", "empty_text"),
        (
            '{"q": "Hi", "a": "Ok", "q_sw": "  \\n\\t", "a_sw": "y"}',
            r"bad.jsonl: line 2: field 'q_sw': empty",
            "empty_text",
        ),
        ('{"q": "Hi", "a": "Ok", ', r"bad.jsonl: line 2: malformed JSON", "malformed_line"),
        ('["q", "a"]', r"bad.jsonl: line 2: record is not an object", "not_an_object"),
        (  # one text over constants.MAX_RECORD_TEXT_CHARS: refused before translation and tokenization
            json.dumps({"q": "Hi", "a": "long " * 40_001, "q_sw": "x", "a_sw": "y"}),
            r"bad.jsonl: line 2: field 'a': 200,005 characters, over the limit of 200,000",
            "too_long",
        ),
    ],
)
def test_bad_records_error_or_skip(tmp_path, line, pattern, reason):
    path = _write_jsonl(tmp_path, [GOOD, line, GOOD.replace("two", "three")])
    with pytest.raises(DataError, match=pattern):
        build_text_dataset(_cfg(tmp_path, source=str(path), **_fields()), progress=False)
    dsd, summary = build_text_dataset(
        _cfg(tmp_path, source=str(path), on_bad_record="skip", **_fields()), progress=False
    )
    assert len(dsd["train"]) == 2 and summary["skipped_bad_records"] == {reason: 1}
    assert any("line 2" in e for e in summary["skipped_examples"])


def test_missing_file_and_bad_csv_record(tmp_path):
    with pytest.raises(DataError, match=r"nope/missing.jsonl: data file not found"):
        build_text_dataset(_cfg(tmp_path, source="nope/missing.jsonl", **_fields()), progress=False)
    path = tmp_path / "d.csv"
    recs = _cols(RECS)
    recs[1]["a"] = "   "
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    with pytest.raises(DataError, match=r"d.csv: record 1 \(line 3\): field 'a': empty"):
        build_text_dataset(_cfg(tmp_path, source=str(path), **_fields()), progress=False)


def test_all_records_bad_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path, ['{"q": ""}', "nonsense"])
    with pytest.raises(DataError, match="no usable examples"):
        build_text_dataset(_cfg(tmp_path, source=str(path), on_bad_record="skip", **_fields()), progress=False)


# -------------------------------------------------------------------------------------- command line
def test_command_line(tmp_path, tok, capsys):
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        f"data:\n  target_lang: sw\n  max_length: 64\n  cache_dir: {tmp_path / 'c'}\n  output_dir: {tmp_path / 'out'}\n"
    )
    assert main(["--config", str(cfg_path), "--tokenizer", str(tok_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kept 134" in out and "tgt_tgt" in out and "p90" in out  # demo-085 dropped by the quality gate
    import datasets

    dsd = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(dsd["train"]) + len(dsd["eval"]) == 134 and dsd["train"][0]["target_lang"] == "sw"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tokenized"]["train"]["token_lengths"]["en_en"]["n"] > 0
    # a bad value: a clear message and exit code 2
    assert main(["--config", str(cfg_path), "--set", "data.source=missing.csv", "--no-tokenize"]) == 2
    assert "missing.csv: data file not found" in capsys.readouterr().err


def test_a_missing_tokenizer_is_one_line_before_the_dataset_is_built(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--no-progress", "--set", f"data.output_dir={out}", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    assert main([*args, "--tokenizer", str(tmp_path / "missing_tokenizer")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--tokenizer {tmp_path / 'missing_tokenizer'}: local tokenizer" in err
    (tmp_path / "not_a_tokenizer").mkdir()
    assert main([*args, "--tokenizer", str(tmp_path / "not_a_tokenizer")]) == 2
    assert "no tokenizer could be loaded" in capsys.readouterr().err
    assert not out.exists()  # refused before the text dataset was built and published


def test_save_text_dataset_replaces_atomically(tmp_path):
    cfg = _cfg(tmp_path, max_examples=3)
    dsd, summary = build_text_dataset(cfg, progress=False)
    out = save_text_dataset(dsd, summary, tmp_path / "o")
    save_text_dataset(dsd, summary, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == ["o"]


def test_a_text_file_named_parquet_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_text('{"q": "not parquet"}\n')
    with pytest.raises(DataError, match=r"pairs.parquet: not a readable parquet file"):
        build_text_dataset(_cfg(tmp_path, source=str(path), **_fields()), progress=False)


def test_a_folder_of_mixed_file_types_is_refused_not_read_in_part(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    _write_jsonl(folder, [json.dumps(r) for r in RECS])
    (folder / "more.csv").write_text("q,a\nx,y\n")
    (folder / ".hidden.txt").write_text("ignored: hidden files are not data")
    types = r"\(\.jsonl \(e\.g\. bad\.jsonl\), \.csv \(e\.g\. more\.csv\)\)"
    with pytest.raises(DataError, match=r"src: data files of several types " + types):
        build_text_dataset(_cfg(tmp_path, source=str(folder), **_fields()), progress=False)


def test_host_token_range_check_names_the_position():
    from clo_fast.data.collate import check_token_range, collate_clo

    ex = {"input_ids": [[1, 2, 3]] * 4, "labels": [[-100, 2, 3]] * 4}
    batch = collate_clo([ex], pad_token_id=0, pad_to_multiple_of=1)
    check_token_range(batch, vocab_size=4, where="step 1")
    with pytest.raises(ValueError, match=r"step 1: input_ids\[0, 2\] = 3 is outside .*\[0, 3\)"):
        check_token_range(batch, vocab_size=3, where="step 1")
