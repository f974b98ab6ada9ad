"""The demo model: a tiny Llama-architecture causal LM and a tokenizer trained offline on the demo texts.

`model.name_or_path: demo` in a run config resolves, through `ensure_demo_model`, to a directory written
with `save_pretrained` (config.json, model.safetensors, tokenizer files with a chat template), so the
trainer loads it through exactly the same `from_pretrained` path as a real hub model or local checkpoint.

Deterministic: the tokenizer is a byte-level BPE trained with `tokenizers` on the bundled demo texts
(sorted, fixed order), the weights are initialised under a fixed seed, and a short single-threaded
pretraining (`pretrain_base`) makes it an *English-centric base*, the starting point CLO assumes: it
follows the instruction template in English only and has read a little Swahili and Korean as plain text.
So before CLO it answers Swahili prompts in English; CLO has to teach it to answer them in Swahili.
The pretraining never sees the held-out pairs that the demo config evaluates on (`heldout_ids`). The directory
name is a hash of the texts and the build recipe, so a change of the demo data or of this file's recipe builds a
new one.
Several processes may call `ensure_demo_model` at once (DeepSpeed ranks): each builds into a private
temporary directory and publishes it with an atomic rename; the first one wins, the others discard theirs.

    python -m clo_fast.demo_model [--out DIR]     # build (or find) it and print its path
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from clo_fast import numerics
from clo_fast.atomic import build_in_own_process
from clo_fast.constants import DEFAULT_CACHE_DIR
from clo_fast.logs import add_log_level_argument, setup_logging

RECIPE_VERSION = 3  # bump when the recipe below changes
DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo_data"

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
# Chat template: <s><|user|>\n...</s>\n<|assistant|>\n...</s>\n ; add_generation_prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
EXTRA_SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>"]

# tiny Llama: ~0.8 M parameters; GQA (4 heads, 2 KV heads) and tied embeddings, like Llama-3.2 / Qwen-2.5
MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
VOCAB_SIZE = 2048  # BPE target size (specials included); ~47 tokens per demo response
SEED = 1234
# Pretraining that makes the demo model an "English-centric base", as CLO assumes (all parameters, causal LM,
# ~45 s on one CPU thread). The documents are the demo pairs *outside* the held-out split (`heldout_ids`):
#   - English instruction/response pairs in the instruction template (the only instruction data it sees),
#   - Swahili and Korean pairs as plain text, "instruction\nresponse", never in the template.
# One pass over the corpus holds every English pair `en_repeat` times, every Swahili text once and, in
# alternating halves, every other Korean text (Korean is not the demo's target language). Passes are shuffled,
# concatenated and cut into `block`-token rows (packed, no padding); `steps` rows×`batch` in all (~17 passes).
# Result: English answers to English *and* Swahili prompts (held-out fidelity en 1.0, sw 0.0 at the base).
PRETRAIN = {
    "steps": 480,
    "batch": 8,
    "block": 128,
    "lr": 3e-3,
    "warmup_steps": 20,
    "en_repeat": 2,
    "other_langs": ("sw", "ko"),
    "half_weight_langs": ("ko",),
    "max_tokens": 128,
    "template": "### Instruction:\n{instruction}\n\n### Response:\n",
    "heldout": {"seed": 0, "eval_fraction": 0.1},
}  # = data.seed / data.eval_fraction of configs/demo.yaml

# Used only when the demo data has not been written yet (keeps the model buildable in isolation).
_FALLBACK_TEXTS = [
    "What is the capital of France?",
    "The capital of France is Paris.",
    "Give me three tips for staying healthy.",
    "Eat well, sleep enough and exercise every day.",
    "Mji mkuu wa Ufaransa ni upi?",
    "Mji mkuu wa Ufaransa ni Paris.",
    "프랑스의 수도는 어디입니까?",
    "프랑스의 수도는 파리입니다.",
]


def _collect_strings(obj, out: list[str]) -> None:
    if isinstance(obj, str):
        if obj.strip():
            out.append(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            _collect_strings(obj[k], out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_strings(v, out)


def demo_texts(data_dir: Path = DEMO_DATA_DIR) -> list[str]:
    """Every string in the bundled demo data files (.json/.jsonl/.txt), in a fixed order."""
    texts: list[str] = []
    if data_dir.is_dir():
        for f in sorted(p for p in data_dir.rglob("*") if p.is_file()):
            try:
                if f.suffix == ".jsonl":
                    for line in f.read_text(encoding="utf-8").splitlines():
                        if line.strip():
                            _collect_strings(json.loads(line), texts)
                elif f.suffix == ".json":
                    _collect_strings(json.loads(f.read_text(encoding="utf-8")), texts)
                elif f.suffix == ".txt":
                    texts.extend(t for t in f.read_text(encoding="utf-8").splitlines() if t.strip())
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
    return texts or list(_FALLBACK_TEXTS)


def demo_records(data_dir: Path = DEMO_DATA_DIR) -> list[dict]:
    """The records of the bundled demo .jsonl files (dicts with id, instruction, response, *_ko, *_sw), in order."""
    recs = []
    if data_dir.is_dir():
        for f in sorted(data_dir.rglob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    continue
                if (
                    isinstance(rec, dict)
                    and isinstance(rec.get("instruction"), str)
                    and isinstance(rec.get("response"), str)
                ):
                    recs.append(rec)
    return recs


def demo_english_pairs(data_dir: Path = DEMO_DATA_DIR) -> list[tuple[str, str]]:
    """(instruction, response) English pairs of the demo data (records with those two fields)."""
    pairs = [(r["instruction"], r["response"]) for r in demo_records(data_dir)]
    return pairs or [(_FALLBACK_TEXTS[i], _FALLBACK_TEXTS[i + 1]) for i in (0, 2)]


def heldout_ids(
    records: list[dict],
    seed: int = PRETRAIN["heldout"]["seed"],
    eval_fraction: float = PRETRAIN["heldout"]["eval_fraction"],
) -> set[str]:
    """Ids of the pairs `clo_fast.data.build_text_dataset` puts in the "eval" split for this seed and
    eval_fraction (same shuffle, same count; tests/test_model.py checks it against the demo config's split).
    The pretraining leaves them out, so the evaluation prompts are new to the base model as well."""
    from clo_fast.data.split import eval_size, shuffled_order

    order = shuffled_order(len(records), seed)
    return {str(records[i].get("id")) for i in order[: eval_size(len(records), eval_fraction)]}


def pretrain_documents(records: list[dict]) -> tuple[list[str], dict[str, list[str]]]:
    """(English template texts, {lang: plain texts}) of the pretraining corpus; held-out pairs excluded."""
    held = heldout_ids(records)
    recs = [r for r in records if str(r.get("id")) not in held]
    english = [PRETRAIN["template"].format(instruction=r["instruction"]) + r["response"] for r in recs]
    other = {
        lang: [
            r[f"instruction_{lang}"] + "\n" + r[f"response_{lang}"]
            for r in recs
            if isinstance(r.get(f"instruction_{lang}"), str) and isinstance(r.get(f"response_{lang}"), str)
        ]
        for lang in PRETRAIN["other_langs"]
    }
    return english, other


def pretrain_base(model, tokenizer, records: list[dict]) -> list[float]:
    """Deterministic full-parameter causal-LM pretraining on the corpus of `pretrain_documents` (see PRETRAIN);
    returns the per-step losses."""
    import torch

    english, other = pretrain_documents(records)
    if not english:  # no demo data (fallback texts): English pairs only
        english = [PRETRAIN["template"].format(instruction=x) + y for x, y in demo_english_pairs()]

    def enc(texts):
        return [
            tokenizer(t, add_special_tokens=False)["input_ids"][: PRETRAIN["max_tokens"] - 1] + [tokenizer.eos_token_id]
            for t in texts
        ]

    en_rows, other_rows = enc(english), {lang: enc(t) for lang, t in other.items()}
    g = torch.Generator().manual_seed(SEED)
    B, L, steps = PRETRAIN["batch"], PRETRAIN["block"], PRETRAIN["steps"]
    stream: list[int] = []
    n_pass = 0
    while len(stream) < steps * B * L:  # shuffled passes over the corpus, concatenated (documents end in EOS)
        docs = en_rows * PRETRAIN["en_repeat"]
        for lang, rows in other_rows.items():
            docs = docs + (rows[n_pass % 2 :: 2] if lang in PRETRAIN["half_weight_langs"] else rows)
        for i in torch.randperm(len(docs), generator=g).tolist():
            stream.extend(docs[i])
        n_pass += 1
    data = torch.tensor(stream[: steps * B * L]).view(steps, B, L)

    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible CPU reductions
    losses = []
    try:
        model.train()
        for step in range(steps):
            warm = PRETRAIN["warmup_steps"]  # linear warmup, then cosine decay to 0
            f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = PRETRAIN["lr"] * f
            loss = model(input_ids=data[step], labels=data[step]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return losses


def _fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "v": RECIPE_VERSION,
                "shape": MODEL_SHAPE,
                "vocab": VOCAB_SIZE,
                "seed": SEED,
                "pretrain": PRETRAIN,
                "template": CHAT_TEMPLATE,
            },
            sort_keys=True,
        ).encode()
    )
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on `texts` (vocab_size tokens, specials included), wrapped in PreTrainedTokenizerFast
    with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")] + EXTRA_SPECIAL
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=EXTRA_SPECIAL,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        padding_side="right",
    )


def build_demo_model(out_dir: str | Path, texts: list[str] | None = None, pretrain: bool = True) -> Path:
    """Train the tokenizer, initialise the tiny Llama under a fixed seed, pretrain it into an English-centric
    base (`pretrain_base`; unless pretrain=False), save both to `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    texts = demo_texts() if texts is None else texts
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    devnull_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    torch.random.set_rng_state(devnull_state)
    losses = pretrain_base(model, tokenizer, demo_records()) if pretrain else []
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "DEMO_MODEL.json").write_text(
        json.dumps(
            {
                "recipe_version": RECIPE_VERSION,
                "texts": len(texts),
                "fingerprint": _fingerprint(texts),
                "parameters": sum(p.numel() for p in model.parameters()),
                "pretrain": PRETRAIN,
                "pretrain_loss_first_last": losses[:1] + losses[-1:],
            },
            indent=1,
        )
    )
    return out_dir


def demo_model_path(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Where the demo model lives under `cache_dir`: named by the texts, the recipe and the CPU numerics it is
    built under (clo_fast.numerics), so a model built with the pinning switched off is never taken for the
    pinned one."""
    mode, _ = numerics.decide()
    return Path(os.path.expanduser(str(cache_dir))) / "demo_model" / f"{_fingerprint(demo_texts())}-{mode}"


def ensure_demo_model(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Path of the demo model directory under `cache_dir`, building it first if needed (safe across processes).

    The build runs as its own `python -m clo_fast.demo_model` process, which pins the CPU numerics before it
    imports torch: the weights are the same whoever asks for them (a test process, a notebook)."""
    final = demo_model_path(cache_dir)
    if (final / "config.json").is_file():
        return final
    # several processes (ranks, test workers) may build it at once: the first to publish wins
    return build_in_own_process(final, "model_cache", "clo_fast.demo_model", "the demo model")


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="build into this directory instead of the cache")
    p.add_argument("--cache-dir", default="~/.cache/clo_fast")
    add_log_level_argument(p)
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    print(build_demo_model(a.out) if a.out else ensure_demo_model(a.cache_dir))


if __name__ == "__main__":
    main()
