"""Real data and real models: chat templates' end-of-turn tokens and system prompts, the BOS prefix, head guards,
dropout, the reference cache key, data preparation outside collectives, conversational and oasst input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings

import pytest
from conftest import make_bpe_tokenizer

from clo_fast.config import ConfigError, DataConfig
from clo_fast.data import build_text_dataset, tokenize_dataset
from clo_fast.data.tokenize import end_of_turn_ids, format_prompt, special_prefix

TEXTS = [
    "Explain why the sky is blue.",
    "The sky looks blue because air scatters short wavelengths more.",
    "Eleza kwa nini anga ni la buluu.",
    "Anga linaonekana la buluu kwa sababu hewa hutawanya mawimbi mafupi zaidi.",
] * 4

# Qwen2.5-like ChatML: adds an English system prompt of its own when the conversation has none
CHATML = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% set rest = messages[1:] %}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% set rest = messages %}"
    "{% endif %}"
    "{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-like: BOS in the template, turns closed by <|eot_id|>, EOS is a different token
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_tok():
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    return make_bpe_tokenizer(TEXTS, vocab_size=400, special_tokens=specials, chat_template=CHATML)


@pytest.fixture(scope="module")
def llama3_tok():
    specials = ["<pad>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return make_bpe_tokenizer(TEXTS, vocab_size=400, special_tokens=specials, chat_template=LLAMA3)


def _cfg(tmp_path, **kw):
    base = {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out"), "target_lang": "sw"}
    return DataConfig(**{**base, **kw})


def _enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def _response(labels):
    return [t for t in labels if t != -100]


# --------------------------------------------------------------------------------------- chat templates
def test_chatml_responses_end_with_im_end_and_system_prompts_are_per_language(tmp_path, chatml_tok):
    tok = chatml_tok
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == [im_end] and im_end != tok.eos_token_id
    cfg = _cfg(tmp_path, template="chat", max_examples=6, eval_fraction=0.0, max_length=512)
    cfg.system_prompt, cfg.system_prompts = "Be brief.", {"sw": "Jibu kwa ufupi."}
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    out = tokenize_dataset(ds, tok, cfg)
    for ex, t in zip(ds, out, strict=True):
        pe = _enc(tok, f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{ex['prompt_en']}<|im_end|>\n")
        pe += _enc(tok, "<|im_start|>assistant\n")
        pt = _enc(
            tok, f"<|im_start|>system\nJibu kwa ufupi.<|im_end|>\n<|im_start|>user\n{ex['prompt_tgt']}<|im_end|>\n"
        )
        pt += _enc(tok, "<|im_start|>assistant\n")
        re_, rt = _enc(tok, ex["response_en"]) + [im_end], _enc(tok, ex["response_tgt"]) + [im_end]
        for k, (p, r) in enumerate([(pe, re_), (pe, rt), (pt, rt), (pt, re_)]):
            assert t["input_ids"][k] == p + r and _response(t["labels"][k]) == r
            assert tok.eos_token_id not in t["input_ids"][k]


def test_template_default_system_prompt_is_reported(tmp_path, chatml_tok):
    cfg = _cfg(tmp_path, template="chat", max_examples=3, eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    with pytest.warns(UserWarning, match="adds a system prompt of its own.*helpful assistant"):
        tokenize_dataset(ds, chatml_tok, cfg, use_cache=False)
    assert "You are a helpful assistant." in format_prompt("hi", chatml_tok, cfg)
    cfg.system_prompts = {"sw": "Jibu."}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_dataset(ds, chatml_tok, cfg, use_cache=False)


def test_llama3_responses_end_with_eot_and_no_system_prompt(tmp_path, llama3_tok):
    tok = llama3_tok
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_ids(tok) == [eot]
    cfg = _cfg(tmp_path, template="chat", max_examples=4, eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the template adds no system prompt: nothing to report
        out = tokenize_dataset(ds, tok, cfg)
    ex, t = ds[0], out[0]
    head = "<s><|start_header_id|>user<|end_header_id|>\n\n"
    tail = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    pt = _enc(tok, head + ex["prompt_tgt"] + tail)
    assert t["input_ids"][2] == pt + _enc(tok, ex["response_tgt"]) + [eot]
    assert t["input_ids"][2].count(tok.bos_token_id) == 1 and "system" not in tok.decode(t["input_ids"][2])


def test_template_without_end_token_falls_back_to_eos(demo_tokenizer):
    assert end_of_turn_ids(demo_tokenizer) == [demo_tokenizer.eos_token_id]


# -------------------------------------------------------------------------------------------- BOS prefix
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


def test_system_prompts_must_be_strings(tmp_path):
    from clo_fast.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  system_prompts: {sw: 3}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: data.system_prompts.sw: must be a string"):
        load_config(cfg)
