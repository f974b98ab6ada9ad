"""The miniature fact world: a base model that *knows* facts in English and *reads* Swahili but answers in English,
so that CLO's claims (transfer to the target language, English kept) can be measured on a 2-core CPU.

Everything is generated offline and deterministically from this file:

- entities: fictional names, each with one value per attribute (color, food, home, animal) from closed sets of six;
  the Swahili words are real Swahili, so the language identifier recognises the sentences (names whose sentences
  it would misread are left out when the world is built);
- the base's pretraining text (`pretraining_documents`): English fact sentences about *every* entity; English
  question/answer pairs in the instruction template for the `qa` entities; plain Swahili fact sentences (never in
  the template) for the `swahili` entities, a minority;
- fine-tuning pairs (`pairs.jsonl`, for `translator: columns`): English questions and answers about the
  `finetune` entities with their Swahili translations;
- the test set (`test.jsonl`): one question per attribute and language about each `test` entity, whose facts
  appear only in the English fact sentences of the pretraining text (no question, no Swahili, no fine-tuning).

A model answers with the fact sentence ("The color of Zorvak is red." / "Rangi ya Zorvak ni nyekundu."), so a
response is scored by which attribute values it names (`score_response`): correct, and correct *in the prompt's
language*. The base is the demo model's tiny Llama (`clo_fast.demo_model.MODEL_SHAPE`, its tokenizer recipe) on
this corpus, pretrained single-threaded for a few minutes.

`model.name_or_path: world` and `data.source: world` in a run config resolve through `ensure_world` to the built
(cached) world: `<data.cache_dir>/world/<fingerprint>/{base/, pairs.jsonl, test.jsonl, WORLD.json}`.

    python -m clo_fast.world [--cache-dir DIR]     # build (or find) it and print its folder
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

from clo_fast.atomic import atomic_directory
from clo_fast.constants import DEFAULT_CACHE_DIR
from clo_fast.constants import WORLD_TARGET_LANG as TARGET_LANG

RECIPE_VERSION = 1  # bump when the recipe below changes
SEED = 2026

# attribute: English question and fact/answer, Swahili question and fact/answer, values English → Swahili
ATTRIBUTES = {
    "color": {
        "en_q": "Which color does {e} like the most?",
        "en_a": "The color that {e} likes the most is {v}.",
        "sw_q": "Je, {e} anapenda rangi gani zaidi?",
        "sw_a": "Rangi ambayo {e} anaipenda zaidi ni {v}.",
        "values": {
            "red": "nyekundu",
            "blue": "buluu",
            "green": "kijani",
            "black": "nyeusi",
            "white": "nyeupe",
            "yellow": "manjano",
        },
    },
    "food": {
        "en_q": "Which food does {e} eat every day?",
        "en_a": "The food that {e} eats every day is {v}.",
        "sw_q": "Je, {e} hula chakula gani kila siku?",
        "sw_a": "Chakula ambacho {e} hula kila siku ni {v}.",
        "values": {
            "rice": "wali",
            "fish": "samaki",
            "bread": "mkate",
            "fruit": "matunda",
            "meat": "nyama",
            "beans": "maharagwe",
        },
    },
    "home": {
        "en_q": "Where does {e} live with the family?",
        "en_a": "The place where {e} lives with the family is the {v}.",
        "sw_q": "Je, {e} anaishi wapi pamoja na familia?",
        "sw_a": "Mahali ambapo {e} anaishi pamoja na familia ni {v}.",
        "values": {
            "forest": "msitu",
            "mountain": "mlima",
            "river": "mto",
            "town": "mji",
            "village": "kijiji",
            "island": "kisiwa",
        },
    },
    "animal": {
        "en_q": "Which animal does {e} keep at home?",
        "en_a": "The animal that {e} keeps at home is the {v}.",
        "sw_q": "Je, {e} anafuga mnyama gani nyumbani?",
        "sw_a": "Mnyama ambaye {e} anamfuga nyumbani ni {v}.",
        "values": {
            "dog": "mbwa",
            "cat": "paka",
            "goat": "mbuzi",
            "horse": "farasi",
            "bird": "ndege",
            "lion": "simba",
        },
    },
}
# name parts: two syllables, consonant-final: neither English nor Swahili words (names are the same in both languages)
NAME_HEADS = (
    "Zu", "Qo", "Ta", "Vi", "Xe", "Ro", "Ka", "Mi", "Lu", "Fe", "Na", "Po", "Se", "Di", "Gu",
    "Bo", "Ha", "Ye", "Wu", "Je", "Ce", "Ni", "Zo", "Qa", "Te", "Vo", "Xa", "Ri", "Ku", "Mo",
)  # fmt: skip
NAME_TAILS = (
    "vax", "rix", "zor", "qel", "tux", "mox", "dex", "lin", "vor", "kaz", "pex", "zin", "wol", "dax", "rul",
)  # fmt: skip
# entity groups, as counts in the order the names are dealt: every entity's facts are in the English pretraining
# text; the groups say what else is
WORLD = {
    "entities": 360,
    "qa": (0, 180),  # English Q&A in the instruction template in pretraining
    "finetune": (120, 240),  # fine-tuning pairs (English + Swahili): 120 entities × 4 attributes = 480 pairs
    "swahili": (180, 270),  # plain Swahili fact sentences in pretraining (a quarter of the entities)
    "test": (300, 360),  # held out: English facts only; 60 × 4 = 240 test questions per language
}
# pretraining of the base (all parameters, causal LM, single thread; ~3 M tokens, ~90 passes over the corpus)
PRETRAIN = {
    "steps": 1500,
    "batch": 16,
    "block": 128,
    "lr": 3e-3,
    "warmup_steps": 30,
    "vocab_size": 1024,
    "template": "### Instruction:\n{instruction}\n\n### Response:\n",  # = data.prompt_template of configs/world.yaml
}


def entity_names() -> list[str]:
    """Every candidate name, in a fixed shuffled order."""
    import random

    names = [h + t for h in NAME_HEADS for t in NAME_TAILS]
    random.Random(SEED).shuffle(names)
    return names


def sentence(attr: str, kind: str, entity: str, value_en: str | None = None) -> str:
    """kind: en_q, en_a, sw_q, sw_a; value_en names the value (translated for sw_a)."""
    a = ATTRIBUTES[attr]
    v = a["values"][value_en] if kind == "sw_a" else value_en
    return a[kind].format(e=entity, v=v)


def build_entities(n: int = WORLD["entities"]) -> list[dict]:
    """n entities {name, attributes: {attr: English value}}: values drawn under SEED; names whose sentences the
    language identifier misreads (any of the 16 in either language) are skipped."""
    import random

    from clo_fast.language_id import get_identifier

    lid = get_identifier(["en", TARGET_LANG], [])
    rng = random.Random(SEED + 1)
    out = []
    for name in entity_names():
        attrs = {attr: rng.choice(sorted(spec["values"])) for attr, spec in ATTRIBUTES.items()}
        texts, langs = [], []
        for attr, v in attrs.items():
            for kind in ("en_q", "en_a", "sw_q", "sw_a"):
                texts.append(sentence(attr, kind, name, v))
                langs.append(kind[:2])
        if lid.detect_batch(texts) == langs:
            out.append({"name": name, "attributes": attrs})
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} of {n} entity names are read correctly by the language identifier")


def _group(entities: list[dict], name: str) -> list[dict]:
    lo, hi = WORLD[name]
    return entities[lo:hi]


def pretraining_documents(entities: list[dict]) -> dict[str, list[str]]:
    """{"facts": one English document per entity (its fact sentences), "qa": English Q&A in the template,
    "swahili": one plain Swahili document per `swahili` entity}."""
    tpl = PRETRAIN["template"]
    facts = [" ".join(sentence(a, "en_a", e["name"], v) for a, v in e["attributes"].items()) for e in entities]
    qa = [
        tpl.format(instruction=sentence(a, "en_q", e["name"])) + sentence(a, "en_a", e["name"], v)
        for e in _group(entities, "qa")
        for a, v in e["attributes"].items()
    ]
    sw = [
        " ".join(sentence(a, "sw_a", e["name"], v) for a, v in e["attributes"].items())
        for e in _group(entities, "swahili")
    ]
    return {"facts": facts, "qa": qa, "swahili": sw}


def finetune_pairs(entities: list[dict]) -> list[dict]:
    """Records {id, instruction, response, instruction_sw, response_sw} of the `finetune` entities."""
    return [
        {
            "id": f"{e['name']}-{a}",
            "instruction": sentence(a, "en_q", e["name"]),
            "response": sentence(a, "en_a", e["name"], v),
            f"instruction_{TARGET_LANG}": sentence(a, "sw_q", e["name"]),
            f"response_{TARGET_LANG}": sentence(a, "sw_a", e["name"], v),
        }
        for e in _group(entities, "finetune")
        for a, v in e["attributes"].items()
    ]


def test_items(entities: list[dict]) -> list[dict]:
    """Evaluation items {id, lang, prompt, reference, attribute, answer} about the `test` entities: English items
    first, then Swahili, the same ids in both (a prompt and its translation)."""
    items = []
    for lang in ("en", TARGET_LANG):
        for e in _group(entities, "test"):
            for a, v in e["attributes"].items():
                items.append(
                    {
                        "id": f"{e['name']}-{a}",
                        "lang": lang,
                        "prompt": sentence(a, f"{lang}_q", e["name"]),
                        "reference": sentence(a, f"{lang}_a", e["name"], v),
                        "attribute": a,
                        "answer": v,
                    }
                )
    return items


_WORD = re.compile(r"[a-z]+")


def score_response(text: str, attribute: str, answer: str, lang: str) -> dict:
    """{"correct": the response names the right value (English or Swahili word) and no other value of the
    attribute, "correct_in_lang": correct, and named in the prompt's language}. The language of the whole
    response is the language identifier's business (fidelity); this scores the value slot."""
    words = set(_WORD.findall(text.lower()))
    values = ATTRIBUTES[attribute]["values"]
    named = {(en, "en") for en in values if en in words}
    named |= {(en, TARGET_LANG) for en, sw in values.items() if sw in words}
    correct = bool(named) and {en for en, _ in named} == {answer}
    in_lang = correct and (answer, lang) in named
    return {"correct": correct, "correct_in_lang": in_lang}


def world_fingerprint() -> str:
    from clo_fast.demo_model import CHAT_TEMPLATE, MODEL_SHAPE

    blob = {
        "v": RECIPE_VERSION,
        "seed": SEED,
        "attributes": ATTRIBUTES,
        "names": [NAME_HEADS, NAME_TAILS],
        "world": WORLD,
        "pretrain": PRETRAIN,
        "shape": MODEL_SHAPE,
        "template": CHAT_TEMPLATE,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def world_dir(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / "world" / world_fingerprint()


def pretrain(model, tokenizer, docs: dict[str, list[str]]) -> list[float]:
    """Deterministic causal-LM pretraining: shuffled passes over every document (each ends in EOS), concatenated
    and cut into block-token rows; linear warmup, cosine decay; one thread. Returns the per-step losses."""
    import torch

    texts = [t for kind in docs for t in docs[kind]]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    g = torch.Generator().manual_seed(SEED)
    B, L, steps = PRETRAIN["batch"], PRETRAIN["block"], PRETRAIN["steps"]
    stream: list[int] = []
    while len(stream) < steps * B * L:
        for i in torch.randperm(len(rows), generator=g).tolist():
            stream.extend(rows[i])
    data = torch.tensor(stream[: steps * B * L]).view(steps, B, L)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible CPU reductions
    losses = []
    try:
        model.train()
        for step in range(steps):
            warm = PRETRAIN["warmup_steps"]
            f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = PRETRAIN["lr"] * f
            loss = model(input_ids=data[step], labels=data[step]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % 250 == 0:
                print(f"[world] pretraining step {step}/{steps}: loss {losses[-1]:.3f}", flush=True)
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return losses


def build_world(out_dir: str | os.PathLike) -> Path:
    """Entities, texts, tokenizer and pretrained base into out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from clo_fast.demo_model import MODEL_SHAPE, train_tokenizer

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entities = build_entities()
    docs = pretraining_documents(entities)
    pairs = finetune_pairs(entities)
    items = test_items(entities)
    texts = [t for kind in docs for t in docs[kind]] + [p[k] for p in pairs for k in p if k != "id"]
    tokenizer = train_tokenizer(sorted(texts), vocab_size=PRETRAIN["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    torch.random.set_rng_state(rng_state)
    losses = pretrain(model, tokenizer, docs)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    for name, recs in (("pairs.jsonl", pairs), ("test.jsonl", items)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    (out / "WORLD.json").write_text(
        json.dumps(
            {
                "recipe_version": RECIPE_VERSION,
                "fingerprint": world_fingerprint(),
                "entities": entities,
                "groups": {k: v for k, v in WORLD.items() if k != "entities"},
                "documents": {k: len(v) for k, v in docs.items()},
                "pairs": len(pairs),
                "test_items": len(items),
                "parameters": sum(p.numel() for p in model.parameters()),
                "pretrain": PRETRAIN,
                "pretrain_tokens": PRETRAIN["steps"] * PRETRAIN["batch"] * PRETRAIN["block"],
                "pretrain_loss_first_last": losses[:1] + losses[-1:],
                "build_seconds": round(time.time() - t0, 1),
            },
            indent=1,
        )
    )
    return out


def ensure_world(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """The built world's folder under cache_dir, building it first if needed (safe across processes)."""
    final = world_dir(cache_dir)
    if (final / "base" / "config.json").is_file():
        return final
    print(f"[world] building the miniature world and its base model into {final} (a few minutes)", flush=True)
    with atomic_directory(final, per_process=True, replace=False) as tmp:
        build_world(tmp)
    return final


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    a = p.parse_args(argv)
    print(ensure_world(a.cache_dir))


if __name__ == "__main__":
    main()
