"""clo_fast.data.tokenize: chat templates' end-of-turn tokens and system prompts, the BOS prefix, earlier turns,
and an empty split that is never cached."""

from __future__ import annotations

import warnings

import pytest
from helpers import data_config, token_ids

from clo_fast.data import build_text_dataset, format_prompt, tokenize_dataset
from clo_fast.data.tokenize import end_of_turn_ids, special_prefix


def test_an_empty_tokenized_split_is_never_cached(tmp_path):
    """Every prompt over max_length: the split is empty (the trainer raises), and it is not cached for a rerun."""
    from clo_fast.config import DataConfig
    from clo_fast.data import build_text_dataset, tokenize_dataset
    from clo_fast.demo_model import demo_texts, train_tokenizer

    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "data"), max_length=8)
    texts, _ = build_text_dataset(cfg, progress=False)
    out = tokenize_dataset(texts["eval"], train_tokenizer(demo_texts()), cfg)
    assert len(texts["eval"]) > 0 and len(out) == 0
    cache = tmp_path / "cache" / "tokenized"
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]


def _response(labels):
    return [t for t in labels if t != -100]


def test_chatml_responses_end_with_im_end_and_system_prompts_are_per_language(tmp_path, chatml_tok):
    tok = chatml_tok
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == [im_end] and im_end != tok.eos_token_id
    cfg = data_config(tmp_path, template="chat", max_examples=6, eval_fraction=0.0, max_length=512)
    cfg.system_prompt, cfg.system_prompts = "Be brief.", {"sw": "Jibu kwa ufupi."}
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    out = tokenize_dataset(ds, tok, cfg)
    for ex, t in zip(ds, out, strict=True):
        pe = token_ids(tok, f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{ex['prompt_en']}<|im_end|>\n")
        pe += token_ids(tok, "<|im_start|>assistant\n")
        pt = token_ids(
            tok, f"<|im_start|>system\nJibu kwa ufupi.<|im_end|>\n<|im_start|>user\n{ex['prompt_tgt']}<|im_end|>\n"
        )
        pt += token_ids(tok, "<|im_start|>assistant\n")
        re_, rt = token_ids(tok, ex["response_en"]) + [im_end], token_ids(tok, ex["response_tgt"]) + [im_end]
        for k, (p, r) in enumerate([(pe, re_), (pe, rt), (pt, rt), (pt, re_)]):
            assert t["input_ids"][k] == p + r and _response(t["labels"][k]) == r
            assert tok.eos_token_id not in t["input_ids"][k]


def test_template_default_system_prompt_is_replaced_and_reported(tmp_path, chatml_tok):
    cfg = data_config(tmp_path, template="chat", max_examples=3, eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    with pytest.warns(UserWarning, match="adds a system prompt of its own.*helpful assistant.*empty system turn"):
        tokenize_dataset(ds, chatml_tok, cfg, use_cache=False)
    bare = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("hi", chatml_tok, cfg) == bare
    cfg.system_prompts = {"sw": "Jibu."}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_dataset(ds, chatml_tok, cfg, use_cache=False)


# Llama-3.1-like: a knowledge-date system header in every prompt, whatever the system turn says
LLAMA31 = (
    "{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set rest = messages[1:] %}"
    "{% else %}{% set rest = messages %}{% endif %}{{ '<|eot_id|>' }}"
    "{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_template_header_that_cannot_be_removed_is_reported(tmp_path, llama3_tok):
    tok = llama3_tok.__class__(tokenizer_object=llama3_tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    tok.chat_template = LLAMA31
    cfg = data_config(tmp_path, template="chat", max_examples=3, eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    with pytest.warns(UserWarning, match="Cutting Knowledge Date.*it stays in every prompt"):
        tokenize_dataset(ds, tok, cfg, use_cache=False)
    assert format_prompt("hi", tok, cfg).startswith("<s><|start_header_id|>system<|end_header_id|>\n\nCutting")


def test_llama3_responses_end_with_eot_and_no_system_prompt(tmp_path, llama3_tok):
    tok = llama3_tok
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_ids(tok) == [eot]
    cfg = data_config(tmp_path, template="chat", max_examples=4, eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the template adds no system prompt: nothing to report
        out = tokenize_dataset(ds, tok, cfg)
    ex, t = ds[0], out[0]
    head = "<s><|start_header_id|>user<|end_header_id|>\n\n"
    tail = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    pt = token_ids(tok, head + ex["prompt_tgt"] + tail)
    assert t["input_ids"][2] == pt + token_ids(tok, ex["response_tgt"]) + [eot]
    assert t["input_ids"][2].count(tok.bos_token_id) == 1 and "system" not in tok.decode(t["input_ids"][2])


def test_template_without_end_token_falls_back_to_eos(demo_tokenizer):
    assert end_of_turn_ids(demo_tokenizer) == [demo_tokenizer.eos_token_id]


class _StubTokenizer:
    """A tokenizer whose text tokens change when special tokens are added (as some sentencepiece ones do)."""

    name_or_path = "stub"
    bos_token, bos_token_id = "<s>", 1
    all_special_ids = [0, 1, 2]

    def __init__(self, with_specials):
        self.with_specials = with_specials

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.with_specials if add_special_tokens else [7]}


def test_special_prefix_misaligned_takes_leading_specials_or_warns(demo_tokenizer):
    assert special_prefix(demo_tokenizer) == [demo_tokenizer.bos_token_id]
    assert special_prefix(_StubTokenizer([1, 8])) == [1]
    with pytest.warns(UserWarning, match="go without its BOS token"):
        assert special_prefix(_StubTokenizer([9, 8])) == []


def test_plain_template_renders_earlier_turns(tmp_path):
    from clo_fast.data.tokenize import format_prompt as fp

    cfg = data_config(tmp_path)
    ctx = [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
    ]
    t = cfg.prompt_template
    assert fp("Q2", None, cfg, "en", ctx) == "S.\n\n" + t.replace("{instruction}", "Q1") + "A1\n\n" + t.replace(
        "{instruction}", "Q2"
    )
    assert fp("Q2", None, cfg, "en") == t.replace("{instruction}", "Q2")
