"""Real data and real models: chat templates' end-of-turn tokens and system prompts, the BOS prefix, head guards,
dropout, the reference cache key, data preparation outside collectives, conversational and oasst input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
import warnings

import pytest
from conftest import make_bpe_tokenizer

from clo_fast.config import ConfigError, DataConfig, QualitySettings
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
    # the toy translations are copies ("[sw] Hi"), which the gate would drop (tests/test_data_quality.py)
    base["quality"] = QualitySettings(enabled=False)
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


def test_template_default_system_prompt_is_replaced_and_reported(tmp_path, chatml_tok):
    cfg = _cfg(tmp_path, template="chat", max_examples=3, eval_fraction=0.0)
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
    cfg = _cfg(tmp_path, template="chat", max_examples=3, eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    with pytest.warns(UserWarning, match="Cutting Knowledge Date.*it stays in every prompt"):
        tokenize_dataset(ds, tok, cfg, use_cache=False)
    assert format_prompt("hi", tok, cfg).startswith("<s><|start_header_id|>system<|end_header_id|>\n\nCutting")


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


# ------------------------------------------------------------------------------------------ model guards
TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def _save_tiny(tmp_path, config_cls_name, model_cls_name, name, **extra):
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls_name)(**{**TINY, **extra})
    model = getattr(transformers, model_cls_name)(config)
    out = tmp_path / name
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "extra", "message"),
    [
        ("PhiConfig", "PhiForCausalLM", {}, r"LM head has a bias"),
        ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}, r"config.logit_scale = 0.0625"),
        ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}, r"config.logits_scaling = 8.0"),
        ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}, r"config.final_logit_softcapping = 30.0"),
    ],
)
def test_heads_the_fused_path_does_not_represent_fail_at_load(tmp_path, config_cls, model_cls, extra, message):
    from clo_fast.config import ModelConfig
    from clo_fast.model import load_policy

    path = _save_tiny(tmp_path, config_cls, model_cls, "m", **extra)
    with pytest.raises(ConfigError, match=rf"model '.*m' \({model_cls}\).*{message}"):
        cfg = ModelConfig(name_or_path=str(path), trainable_patterns=["*"], attn_implementation="eager")
        load_policy(cfg, cache_dir=str(tmp_path))


def test_plain_heads_load_and_neutral_scaling_is_accepted(tmp_path):
    from clo_fast.config import ModelConfig
    from clo_fast.model import load_policy

    path = _save_tiny(tmp_path, "GraniteConfig", "GraniteForCausalLM", "g", logits_scaling=1.0)
    load_policy(ModelConfig(name_or_path=str(path), trainable_patterns=["*q_proj*"]), cache_dir=str(tmp_path))


def _logps_float64(model, ids):
    """Independent reference: full logits in float64, Σ log p(next token) per sequence."""
    import torch

    logits = model(input_ids=ids).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return lp.sum(-1)


def test_dropout_is_off_in_the_policy_as_in_the_reference_pass(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from clo_fast.config import ModelConfig
    from clo_fast.constants import IGNORE_INDEX
    from clo_fast.model import load_policy

    path = _save_tiny(tmp_path, "LlamaConfig", "LlamaForCausalLM", "d", attention_dropout=0.5)
    policy = load_policy(
        ModelConfig(name_or_path=str(path), attn_implementation="eager"), head_impl="reference", cache_dir="x"
    )[0]
    assert policy.training
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]  # labels aligned with the rows that score them
    mask = torch.ones_like(ids)
    first, second = policy(ids, mask, labels), policy(ids, mask, labels)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = _logps_float64(ref, ids)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(first, second)
    # the same model left in train mode with its dropout does differ: the check above can fail
    ref.train()
    torch.manual_seed(0)
    assert not torch.allclose(_logps_float64(ref, ids), expected, atol=1e-3)


# ------------------------------------------------------------------------------- reference cache key
def test_reference_cache_key_follows_weights_not_path(tmp_path):
    import shutil

    from clo_fast.config import RunConfig
    from clo_fast.training.reference import reference_key

    class _Data(list):
        _fingerprint = "data-fp"

    cfg, ds = RunConfig(), _Data([1, 2])
    a = _save_tiny(tmp_path, "LlamaConfig", "LlamaForCausalLM", "a")
    key_a = reference_key(ds, cfg, str(a))
    assert reference_key(ds, cfg, str(a)) == key_a  # deterministic
    shutil.copytree(a, tmp_path / "a_copy")
    assert reference_key(ds, cfg, str(tmp_path / "a_copy"))["model_content"] == key_a["model_content"]
    shutil.rmtree(a)
    _save_tiny(tmp_path, "LlamaConfig", "LlamaForCausalLM", "a", num_hidden_layers=2)  # new weights, same path
    assert reference_key(ds, cfg, str(a))["model_content"] != key_a["model_content"]


def test_fingerprint_memo_skips_unchanged_files_and_rereads_changed_ones(tmp_path):
    import json
    import os

    from clo_fast.pretrained import model_fingerprint

    a = _save_tiny(tmp_path, "LlamaConfig", "LlamaForCausalLM", "a")
    memo = tmp_path / "memo"
    true_fp = model_fingerprint(str(a))
    assert model_fingerprint(str(a), memo_dir=str(memo)) == true_fp  # first call: every file read, memo written
    (memo_file,) = (memo / "fingerprints").glob("*.json")
    entries = json.loads(memo_file.read_text())
    weights = next(k for k in entries if k.endswith(".safetensors"))
    entries[weights][-1] = "0" * 64  # a planted digest: used while the file's stamp is unchanged
    memo_file.write_text(json.dumps(entries))
    assert model_fingerprint(str(a), memo_dir=str(memo)) != true_fp  # proves the memo was read, not the file
    st = os.stat(a / weights)
    os.utime(a / weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the file "changed": read again
    assert model_fingerprint(str(a), memo_dir=str(memo)) == true_fp
    memo_file.write_text("{damaged")
    assert model_fingerprint(str(a), memo_dir=str(memo)) == true_fp  # a damaged memo only costs a re-hash


def test_hub_snapshot_fingerprint_uses_blob_hashes(tmp_path, monkeypatch):
    from clo_fast.pretrained import model_fingerprint

    repo = tmp_path / "hub" / "models--org--tiny"
    blob = repo / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights v1")
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    fp = model_fingerprint("org/tiny")
    blob2 = repo / "blobs" / ("cd" * 32)
    blob2.write_bytes(b"weights v1")  # same bytes, another blob name: the name is what counts
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(blob2)
    assert model_fingerprint("org/tiny") != fp
    with pytest.raises(ValueError, match="neither a local folder nor in the Hugging Face cache"):
        model_fingerprint("org/absent")


# ------------------------------------------------------------------- data preparation outside collectives
class SlowCachedTranslator:
    """A stand-in for HFTranslator: the shared sqlite cache in front of a slow "model" that tags texts."""

    name = "slow-fake"

    def __init__(self, cache_path, seconds_per_text=0.0):
        from clo_fast.data.translate import TranslationCache

        self.cache = TranslationCache(cache_path)
        self.seconds_per_text = seconds_per_text
        self.translated: list[str] = []  # texts this process ran through the "model"

    def translate(self, texts):
        done = self.cache.get_many(self.name, "en", "sw", texts)
        todo = [t for t in dict.fromkeys(texts) if t not in done]
        for t in todo:
            time.sleep(self.seconds_per_text)
            done[t] = f"[sw] {t}"
        self.cache.put_many(self.name, "en", "sw", [(t, done[t]) for t in todo])
        self.translated += todo
        return [done[t] for t in texts]

    def translate_pairs(self, pairs, src, tgt):
        out = self.translate([p.instruction for p in pairs] + [p.response for p in pairs])
        return list(zip(out[: len(pairs)], out[len(pairs) :], strict=True))


def test_translate_sharded_covers_every_text_own_shard_first(tmp_path):
    from clo_fast.data.build import translate_sharded

    cfg = _cfg(tmp_path, translator="hf", max_examples=20)
    fake = SlowCachedTranslator(tmp_path / "t.sqlite")
    translate_sharded(cfg, 1, 3, translator=fake, progress=False)
    dsd, _ = build_text_dataset(cfg, translator=fake, progress=False)
    rows = list(dsd["train"]) + list(dsd["eval"])
    assert len(rows) == 20 and all(r["prompt_tgt"] == f"[sw] {r['prompt_en']}" for r in rows)
    n_texts = len(fake.translated)
    assert n_texts == len({t for r in rows for t in (r["prompt_en"], r["response_en"])})  # built: nothing new
    # rank 1 of 3 starts with its own shard (every third selected pair from the second)
    from clo_fast.data.build import select_pairs
    from clo_fast.data.sources import BadRecords

    selected = select_pairs(cfg, BadRecords("error"), {})[0]
    own = [t for p in selected[1::3] for t in (p.instruction, p.response)]
    assert fake.translated[: len(set(own))] == list(dict.fromkeys(own))


COLLECTIVES = (
    "barrier", "all_reduce", "broadcast", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "broadcast_object_list", "gather", "gather_object", "scatter", "scatter_object_list", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "monitored_barrier",
)  # fmt: skip


def _prepare_in_world(rank, world, port, tmp, out_dir):
    """One rank of a gloo world: runs the trainer's data stage with a translator that needs 0.05 s per text,
    every torch.distributed collective counted while it runs (the property: none, so no rank can wait in one while
    another translates; proved by the count, not by racing a collective timeout), then a barrier and a gather."""
    import datetime
    import json
    import pathlib

    import torch
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    import clo_fast.data.translate as translate_module
    from clo_fast.config import load_config
    from clo_fast.train import Run

    fake = SlowCachedTranslator(pathlib.Path(tmp) / "cache" / "translations.sqlite", seconds_per_text=0.05)
    translate_module.make_translator = lambda cfg, progress=True: fake
    cfg = load_config(pathlib.Path(tmp) / "run.yaml")
    run = Run(cfg, pathlib.Path(tmp) / "run.yaml", None)
    run.device = torch.device("cpu")  # set by Run.setup, skipped here: the data stage picks the packing for it
    collectives = []
    names = [n for n in COLLECTIVES if hasattr(tdist, n)]
    originals = {n: getattr(tdist, n) for n in names}
    for n in names:
        setattr(tdist, n, lambda *a, _n=n, **k: collectives.append(_n) or originals[_n](*a, **k))
    tdist.barrier()  # both ranks start the data stage together (outside it: not counted)
    collectives.clear()
    try:
        run.data()
    finally:
        held = list(collectives)
        for n in names:
            setattr(tdist, n, originals[n])
    tdist.barrier()
    counts = [None] * world
    tdist.all_gather_object(counts, (len(fake.translated), len(run.train_ds), held))
    if rank == 0:
        pathlib.Path(out_dir, "result.json").write_text(json.dumps(counts))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_data_stage_holds_no_collective_and_shares_translation(tmp_path, llama3_tok):
    import json
    import socket

    import torch.multiprocessing as mp

    tok_dir = tmp_path / "tok"
    llama3_tok.save_pretrained(tok_dir)
    (tmp_path / "run.yaml").write_text(
        f"model: {{name_or_path: {tok_dir}}}\n"
        f"data: {{translator: hf, target_lang: sw, max_examples: 120, cache_dir: {tmp_path / 'cache'}, "
        f"output_dir: {tmp_path / 'data'}, template: chat}}\n"
        f"train: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_prepare_in_world, args=(2, port, str(tmp_path), str(tmp_path)), nprocs=2, start_method="spawn")
    (n0, train0, held0), (n1, train1, held1) = json.loads((tmp_path / "result.json").read_text())
    assert held0 == held1 == []  # no collective in the data stage, on either rank
    n_texts = 240  # 120 pairs of distinct texts
    assert train0 == train1 > 0
    # the two ranks shared the work: each translated a good part, together about all (little overlap)
    assert n0 >= n_texts // 3 and n1 >= n_texts // 3 and n_texts <= n0 + n1 <= n_texts + 4 * 16 * 2


# ----------------------------------------------------------------------------------- conversational input
CONVERSATIONS = [
    {
        "id": "multi",
        "messages": [
            {"role": "system", "content": "You answer about weather."},
            {"role": "user", "content": "Is it raining?"},
            {"role": "assistant", "content": "Yes, lightly."},
            {"role": "user", "content": "Should I take an umbrella?"},
            {"role": "assistant", "content": "Yes, take a small one."},
        ],
    },
    {
        "id": "single",
        "messages": [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
        ],
    },
]


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_turns_context_and_every_turn_translated(tmp_path, chatml_tok):
    import json

    src = _write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONS)
    cfg = _cfg(tmp_path, source=str(src), source_format="messages", translator="hf", template="chat")
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
    expected = _enc(chatml_tok, pt) + _enc(chatml_tok, "[sw] Yes, take a small one.") + [im_end]
    assert out["multi"]["input_ids"][2] == expected
    # a single-turn conversation gets the configured system prompt in the target language only
    single_tgt = chatml(("system", "Jibu."), ("user", "[sw] Name a color."))
    assert out["single"]["input_ids"][2][: len(_enc(chatml_tok, single_tgt))] == _enc(chatml_tok, single_tgt)


def test_evaluation_prompts_encode_as_training_does(tmp_path, chatml_tok):
    """Evaluation items carry their language and conversation: the prompt ids equal the training prompt's
    (per-language system prompt, earlier turns), for every row and both languages."""
    from clo_fast.evaluate.prompts import encode_item, normalize_prompts

    src = _write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONS)
    cfg = _cfg(tmp_path, source=str(src), source_format="messages", translator="hf", template="chat")
    cfg.eval_fraction, cfg.system_prompt, cfg.system_prompts = 0.0, "Be brief.", {"sw": "Jibu."}
    ds = build_text_dataset(cfg, translator=SlowCachedTranslator(tmp_path / "t.sqlite"), progress=False)[0]["train"]
    trained = tokenize_dataset(ds, chatml_tok, cfg)
    items = normalize_prompts([dict(r) for r in ds], "sw")
    assert len(items) == 2 * len(ds)
    for row, t in enumerate(trained):
        for item, seq in zip(items[2 * row : 2 * row + 2], (0, 2), strict=True):
            prompt_len = t["labels"][seq].index(next(x for x in t["labels"][seq] if x != -100))
            assert encode_item(chatml_tok, item, cfg) == t["input_ids"][seq][:prompt_len], (row, item["lang"])


def test_plain_template_renders_earlier_turns(tmp_path):
    from clo_fast.data.tokenize import format_prompt as fp

    cfg = _cfg(tmp_path)
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


def test_messages_with_both_languages(tmp_path):
    import copy

    from clo_fast.data import DataError

    rows = copy.deepcopy(CONVERSATIONS)
    for r in rows:
        r["messages_sw"] = [{"role": m["role"], "content": "SW " + m["content"]} for m in r["messages"]]
    src = _write_jsonl(tmp_path / "both.jsonl", rows)
    cfg = _cfg(tmp_path, source=str(src), source_format="messages", translator="columns", eval_fraction=0.0)
    ds = build_text_dataset(cfg, progress=False)[0]["train"]
    multi = {r["id"]: r for r in ds}["multi"]
    assert multi["prompt_tgt"] == "SW Should I take an umbrella?" and "SW Yes, lightly." in multi["context_tgt"]
    rows[1]["messages_sw"][0]["role"] = "assistant"
    _write_jsonl(src, rows)
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

    src = _write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[1], {"messages": messages}])
    cfg = _cfg(tmp_path, source=str(src), source_format="messages", translator="hf")
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

    src = _write_jsonl(tmp_path / "oasst.jsonl", _oasst_rows())
    cfg = _cfg(tmp_path, source=str(src), source_format="oasst", translator="hf", eval_fraction=0.0)
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
    cfg = _cfg(tmp_path, max_examples=100_000)
    with pytest.warns(UserWarning, match=r"max_examples is 100000 but the source has only \d+ usable pairs"):
        _, summary = build_text_dataset(cfg, progress=False)
    assert summary["fewer_than_max_examples"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_text_dataset(_cfg(tmp_path, max_examples=5), progress=False)[1]["fewer_than_max_examples"] is False


@pytest.mark.slow
def test_demo_run_on_a_cold_cache_with_a_short_collective_timeout(tmp_path):
    """Rank 0 builds the demo model (~45 s) while rank 1 waits for it on disk, not in a collective: with a 20 s
    process-group timeout (and DEEPSPEED_TIMEOUT=1) the run still passes."""
    from test_train import launch

    sets = [
        "train.dist_timeout_s=20",
        "optim.max_steps=2",
        "train.run_evaluation=false",
        "train.export_hf=false",
        "train.save_steps=0",
        "train.eval_steps=0",
    ]
    r = launch(tmp_path, tmp_path / "cold_cache", extra=sets, env={"DEEPSPEED_TIMEOUT": "1"})
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert (tmp_path / "cold_cache" / "demo_model").is_dir() and "final metrics" in r.stdout
