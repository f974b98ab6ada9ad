"""clo_fast.data.sources: reading pairs, conversations (`messages`) and oasst trees; bad records named by file,
line and field; duplicates and short sources."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import CONVERSATIONS, SlowCachedTranslator, data_config, token_ids, write_jsonl

from clo_fast.data import build_text_dataset, tokenize_dataset


def _pairs_cfg(tmp_path, source, **kw):
    from clo_fast.config import DataConfig

    return DataConfig(
        source=str(source),
        target_lang="sw",
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def _record(i, q=None):
    q = q or f"Question number {i}?"
    return {"instruction": q, "response": f"Answer {i}.", "instruction_sw": f"Swali {i}?", "response_sw": f"Jibu {i}."}


def test_duplicate_prompts_are_removed_before_the_split_and_counted(tmp_path):
    from clo_fast.data import build_text_dataset

    recs = [_record(i) for i in range(20)]
    recs += [_record(100 + i, q=f"  question NUMBER {i}? ") for i in range(10)]  # same prompts, other spacing/case
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    dsd, summary = build_text_dataset(_pairs_cfg(tmp_path, src, eval_fraction=0.3), progress=False)
    assert summary["duplicate_prompts_removed"] == 10
    assert len(dsd["train"]) + len(dsd["eval"]) == 20
    train = {" ".join(p.split()).casefold() for p in dsd["train"]["prompt_en"]}
    held_out = {" ".join(p.split()).casefold() for p in dsd["eval"]["prompt_en"]}
    assert held_out and not train & held_out


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_line_is_named_and_honours_on_bad_record(tmp_path, suffix):
    from clo_fast.data import build_text_dataset
    from clo_fast.data.sources import DataError

    lines = [json.dumps(_record(i)).encode() for i in range(5)]
    lines[2] = b'{"instruction": "caf\xe9", "response": "x", "instruction_sw": "y", "response_sw": "z"}'
    src = tmp_path / f"latin1{suffix}"
    src.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"latin1{suffix}: line 3: not valid UTF-8 \(byte 0xe9"):
        build_text_dataset(_pairs_cfg(tmp_path, src), progress=False)
    dsd, summary = build_text_dataset(_pairs_cfg(tmp_path, src, on_bad_record="skip"), progress=False)
    assert summary["skipped_bad_records"] == {"bad_encoding": 1}
    assert len(dsd["train"]) + len(dsd["eval"]) == 4


def test_non_utf8_csv_names_the_line(tmp_path):
    from clo_fast.data import build_text_dataset
    from clo_fast.data.sources import DataError

    src = tmp_path / "latin1.csv"
    src.write_bytes(b"instruction,response,instruction_sw,response_sw\nHi,Ok,x,y\ncaf\xe9,Ok,x,y\n")
    with pytest.raises(DataError, match=r"latin1.csv: line 3: not valid UTF-8"):
        build_text_dataset(_pairs_cfg(tmp_path, src), progress=False)


def test_messages_turns_context_and_every_turn_translated(tmp_path, chatml_tok):
    import json

    src = write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONS)
    cfg = data_config(tmp_path, source=str(src), source_format="messages", translator="hf", template="chat")
    cfg.eval_fraction, cfg.system_prompts = 0.0, {"sw": "Jibu."}
    fake = SlowCachedTranslator(tmp_path / "t.sqlite")
    ds = build_text_dataset(cfg, translator=fake, progress=False)[0]["train"]
    rows = {r["id"]: r for r in ds}
    multi = rows["multi"]
    assert (multi["prompt_en"], multi["response_en"]) == ("Should I take an umbrella?", "Yes, take a small one.")
    assert multi["response_tgt"] == "[sw] Yes, take a small one."
    turns = CONVERSATIONS[0]["messages"][:3]
    assert json.loads(multi["context_en"]) == turns
    assert json.loads(multi["context_tgt"]) == [{"role": t["role"], "content": f"[sw] {t['content']}"} for t in turns]
    assert json.loads(rows["single"]["context_en"]) == []
    out = {r["id"]: r for r in tokenize_dataset(ds, chatml_tok, cfg)}

    def chatml(*turns):
        return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"

    # the conversation's own (translated) system turn, not the configured one; earlier turns translated
    pt = chatml(
        ("system", "[sw] You answer about weather."),
        ("user", "[sw] Is it raining?"),
        ("assistant", "[sw] Yes, lightly."),
        ("user", "[sw] Should I take an umbrella?"),
    )
    im_end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    expected = token_ids(chatml_tok, pt) + token_ids(chatml_tok, "[sw] Yes, take a small one.") + [im_end]
    assert out["multi"]["input_ids"][2] == expected
    # a single-turn conversation gets the configured system prompt in the target language only
    single_tgt = chatml(("system", "Jibu."), ("user", "[sw] Name a color."))
    assert out["single"]["input_ids"][2][: len(token_ids(chatml_tok, single_tgt))] == token_ids(chatml_tok, single_tgt)


def test_messages_with_both_languages(tmp_path):
    import copy

    from clo_fast.data import DataError

    rows = copy.deepcopy(CONVERSATIONS)
    for r in rows:
        r["messages_sw"] = [{"role": m["role"], "content": "SW " + m["content"]} for m in r["messages"]]
    src = write_jsonl(tmp_path / "both.jsonl", rows)
    cfg = data_config(tmp_path, source=str(src), source_format="messages", translator="columns", eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    multi = {r["id"]: r for r in ds}["multi"]
    assert multi["prompt_tgt"] == "SW Should I take an umbrella?" and "SW Yes, lightly." in multi["context_tgt"]
    rows[1]["messages_sw"][0]["role"] = "assistant"
    write_jsonl(src, rows)
    with pytest.raises(DataError, match=r"both.jsonl: line 2: field 'messages_sw'"):
        build_text_dataset(cfg, progress=False)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "Q"}], r"ending with an assistant turn"),
        ([{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}], r"\[1\]: expected \{role"),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}], r"\[1\]: 'content' must be"),
        ("Q", r"expected a non-empty list of turns"),
    ],
)
def test_bad_conversations_name_file_record_and_field(tmp_path, messages, message):
    from clo_fast.data import DataError

    src = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[1], {"messages": messages}])
    cfg = data_config(tmp_path, source=str(src), source_format="messages", translator="hf")
    with pytest.raises(DataError, match=rf"bad.jsonl: line 2: field 'messages'.*{message}"):
        build_text_dataset(cfg, translator=SlowCachedTranslator(tmp_path / "t.sqlite"), progress=False)


def _oasst_rows():
    def msg(mid, parent, role, text, rank=None, lang="en"):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": lang}

    return [
        msg("r", None, "prompter", "First question?"),
        msg("a0", "r", "assistant", "Best first answer.", 0),
        msg("a1", "r", "assistant", "Worse first answer.", 1),
        msg("p2", "a0", "prompter", "Follow-up question?"),
        msg("c0", "p2", "assistant", "Best follow-up answer.", 0),
        msg("p3", "a1", "prompter", "Unanswered follow-up?"),
        msg("x", None, "prompter", "Frage?", lang="de"),
        msg("xa", "x", "assistant", "Antwort.", 0, lang="de"),
    ]


def test_oasst_every_prompter_turn_with_its_context(tmp_path):
    import json

    src = write_jsonl(tmp_path / "oasst.jsonl", _oasst_rows())
    cfg = data_config(tmp_path, source=str(src), source_format="oasst", translator="hf", eval_fraction=0.0)
    fake = SlowCachedTranslator(tmp_path / "t.sqlite")
    roots_only, summary = build_text_dataset(cfg, translator=fake, progress=False)
    assert [(r["prompt_en"], r["response_en"]) for r in roots_only["train"]] == [
        ("First question?", "Best first answer.")
    ]
    cfg.oasst_all_turns = True
    dsd, summary = build_text_dataset(cfg, translator=fake, progress=False)
    rows = {r["prompt_en"]: r for r in dsd["train"]}
    assert set(rows) == {"First question?", "Follow-up question?"}
    assert rows["Follow-up question?"]["response_en"] == "Best follow-up answer."
    assert json.loads(rows["Follow-up question?"]["context_en"]) == [
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "Best first answer."},
    ]
    assert json.loads(rows["Follow-up question?"]["context_tgt"])[1]["content"] == "[sw] Best first answer."
    assert summary["filtered"] == {"oasst_no_ranked_reply": 1, "oasst_other_language": 1}


def test_fewer_pairs_than_max_examples_warns(tmp_path):
    cfg = data_config(tmp_path, max_examples=100_000)
    with pytest.warns(UserWarning, match=r"max_examples is 100000 but the source has only \d+ usable pairs"):
        _, summary = build_text_dataset(cfg, progress=False)
    assert summary["fewer_than_max_examples"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            build_text_dataset(data_config(tmp_path, max_examples=5), progress=False)[1]["fewer_than_max_examples"]
            is False
        )
