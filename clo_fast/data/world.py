"""The miniature fact world's text (the base model built on it: clo_fast/world.py): fictional entities with one
value per attribute from closed sets, English and Swahili sentences about them, and which entities each text
covers. Deterministic; nothing is downloaded.

- entities: fictional names, each with one value per attribute (color, food, home, animal) from closed sets of six;
  the Swahili words are real Swahili, so the language identifier recognises the sentences (names whose sentences
  it would misread are left out);
- pretraining text (`pretraining_documents`): English fact sentences about *every* entity; English question/answer
  pairs in the instruction template for the `qa` entities; plain Swahili fact sentences (never in the template) for
  the `swahili` entities: most of the non-held-out ones, and half of each held-out split;
- fine-tuning pairs (`finetune_pairs`; `data.source: world`, `translator: columns`): English questions and answers
  about the `finetune` entities with their Swahili translations (a quarter of them known in Swahili from pretraining,
  the rest only in English: fine-tuning shows answering a Swahili question from English-only knowledge);
- two held-out splits of entities that appear in no Q&A and no fine-tuning pair, each in two parts (`held_out_items`;
  the `part` of an item): `known` entities whose facts are also in the Swahili pretraining text (a positive control:
  a Swahili answer can be recalled) and `transfer` entities whose facts are only in English (a correct Swahili answer
  needs knowledge to cross languages). `valid` chooses each method's settings; `test` (`test_items`) decides the
  claims and is never used to choose anything.

A model answers with the fact sentence ("The color that Zuvax likes the most is red." / "Rangi ambayo Zuvax
anaipenda zaidi ni nyekundu."), so a response is scored by the attribute values it names (`score_response`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re

from clo_fast.constants import WORLD_TARGET_LANG as TARGET_LANG

SEED = 2026
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"  # = data.prompt_template of configs/world.yaml

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
# entity groups, as index ranges in the order the names are dealt: every entity's facts are in the English
# pretraining text; the groups say what else is. Held-out entities (valid, test) are in no Q&A and no fine-tuning pair.
WORLD = {
    "entities": 360,
    "qa": ((0, 180),),  # English Q&A in the instruction template in pretraining
    "finetune": ((120, 240),),  # fine-tuning pairs (English + Swahili): 120 entities × 4 attributes = 480 pairs
    # plain Swahili fact sentences in pretraining: 150 of the 240 non-held-out entities (30 of them fine-tuned), and
    # the `known` half of each held-out split
    "swahili": ((0, 150), (240, 270), (300, 330)),
    "valid": ((240, 300),),  # held out, for choosing settings: 30 known in Swahili + 30 English-only
    "test": ((300, 360),),  # held out, for the claims: 30 known in Swahili + 30 English-only (240 questions/language)
}
PARTS = ("known", "transfer")  # held-out entities with / without Swahili sentences in pretraining


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


@functools.lru_cache(maxsize=2)
def _entities(n: int) -> tuple:
    return tuple(_build_entities(n))


def build_entities(n: int = WORLD["entities"]) -> list[dict]:
    """n entities {name, attributes: {attr: English value}} (built once per process)."""
    return [dict(e) for e in _entities(n)]


def _build_entities(n: int) -> list[dict]:
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
    return [e for lo, hi in WORLD[name] for e in entities[lo:hi]]


def _indices(name: str) -> set[int]:
    return {i for lo, hi in WORLD[name] for i in range(lo, hi)}


def held_out_entities(entities: list[dict], split: str) -> list[tuple[dict, str]]:
    """(entity, part) of a held-out split ("valid" or "test"), parts alternating (known, transfer, known, ...) so
    that the first n items of a split hold both parts."""
    if split not in ("valid", "test"):
        raise ValueError(f"held-out split must be 'valid' or 'test', got {split!r}")
    sw = _indices("swahili")
    idx = sorted(_indices(split))
    known = [(entities[i], "known") for i in idx if i in sw]
    transfer = [(entities[i], "transfer") for i in idx if i not in sw]
    out = [x for pair in zip(known, transfer, strict=False) for x in pair]
    n = min(len(known), len(transfer))
    return out + known[n:] + transfer[n:]


def pretraining_documents(entities: list[dict]) -> dict[str, list[str]]:
    """{"facts": one English document per entity (its fact sentences), "qa": English Q&A in the template,
    "swahili": one plain Swahili document per `swahili` entity}."""
    tpl = TEMPLATE
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


def held_out_items(entities: list[dict], split: str) -> list[dict]:
    """Evaluation items {id, lang, prompt, reference, attribute, answer, entity, part} about a held-out split's
    entities (`held_out_entities`): English items first, then Swahili, the same ids in both (a prompt and its
    translation)."""
    items = []
    for lang in ("en", TARGET_LANG):
        for e, part in held_out_entities(entities, split):
            for a, v in e["attributes"].items():
                items.append(
                    {
                        "id": f"{e['name']}-{a}",
                        "lang": lang,
                        "prompt": sentence(a, f"{lang}_q", e["name"]),
                        "reference": sentence(a, f"{lang}_a", e["name"], v),
                        "attribute": a,
                        "answer": v,
                        "entity": e["name"],
                        "part": part,
                    }
                )
    return items


def test_items(entities: list[dict]) -> list[dict]:
    """The test split's items (`held_out_items`): decide the claims, never choose settings."""
    return held_out_items(entities, "test")


def validation_items(entities: list[dict]) -> list[dict]:
    """The validation split's items (`held_out_items`): choose each method's settings."""
    return held_out_items(entities, "valid")


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


def named_value(text: str, attribute: str, lang: str) -> str | None:
    """The attribute value (its English word) a response names in the prompt's language, when it names exactly one
    value and in that language; else None. What a model *answered*, for the chance baseline of its own answers."""
    words = set(_WORD.findall(text.lower()))
    values = ATTRIBUTES[attribute]["values"]
    named = {(en, "en") for en in values if en in words}
    named |= {(en, TARGET_LANG) for en, sw in values.items() if sw in words}
    ens = {en for en, _ in named}
    if len(ens) != 1:
        return None
    (en,) = ens
    return en if (en, lang) in named else None


def text_fingerprint() -> str:
    """A hash of everything the world's text depends on."""
    blob = {"seed": SEED, "attributes": ATTRIBUTES, "names": [NAME_HEADS, NAME_TAILS], "world": WORLD, "t": TEMPLATE}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
