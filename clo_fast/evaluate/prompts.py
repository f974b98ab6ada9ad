"""Evaluation prompts: from the text dataset's held-out split or a file, normalised to one item per language,
and encoded exactly as training encodes them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from clo_fast.config import RunConfig, target_languages
from clo_fast.data.sources import CHAT_ROLES
from clo_fast.data.tokenize import format_prompt, special_prefix
from clo_fast.evaluate.errors import EvalError
from clo_fast.language_id import normalize_lang


def normalize_prompts(
    records: Sequence[dict], target_lang: str | Sequence[str], max_per_lang: int | None = None
) -> list[dict]:
    """Turn prompt records into evaluation items `{"id", "lang", "prompt", "reference", "context"}`.

    A record is either a row of the text-level dataset (`prompt_en`, `response_en`, `prompt_tgt`,
    `response_tgt`, optional `id`, `target_lang`, `context_en` / `context_tgt`: gives one English and one
    target-language item), or one item (`prompt`, `lang`, optional `reference`, `id`, `context`: the earlier
    turns, a list of {role, content}). `reference` may be None (no NLL or chrF for that item).
    Keeps at most `max_per_lang` items per language, in input order. `target_lang`: the run's target language,
    or its languages (data.target_langs: rows of several languages share their English prompt, which gives one
    English item).
    """
    targets = [normalize_lang(c) for c in ([target_lang] if isinstance(target_lang, str) else target_lang)]
    items: list[dict] = []
    english: set[str] = set()
    for i, rec in enumerate(records):
        for it in _record_items(i, rec, targets):
            if it["lang"] == "en" and "prompt_en" in rec:  # one English item per English prompt
                if it["id"] in english:
                    continue
                english.add(it["id"])
            items.append(it)
    for it in items:
        if not it["prompt"].strip():
            raise EvalError(f"prompt id {it['id']} ({it['lang']}): empty prompt")
    if max_per_lang is not None:
        seen: Counter = Counter()
        kept = []
        for it in items:
            if seen[it["lang"]] < max_per_lang:
                seen[it["lang"]] += 1
                kept.append(it)
        items = kept
    if not items:
        raise EvalError("no evaluation prompts: the prompt list is empty")
    return items


def load_eval_prompts(cfg: RunConfig) -> list[dict]:
    """The first eval.max_prompts rows of the text-level dataset's "eval" split
    (`clo_fast.data.load_or_build_text_dataset`: the dataset training saved, or built from cfg.data)."""
    import clo_fast.data as data

    # the saved dataset when it matches the data config (same split as training), else build and save it
    dsd, _summary = data.load_or_build_text_dataset(cfg.data)
    if "eval" not in dsd or len(dsd["eval"]) == 0:
        raise EvalError(
            f"no evaluation prompts: the text dataset from data.source={cfg.data.source!r} has an empty 'eval' split "
            f"(data.eval_fraction={cfg.data.eval_fraction}); raise data.eval_fraction or pass --prompts FILE.jsonl"
        )
    n = min(len(dsd["eval"]), cfg.eval.max_prompts * len(target_languages(cfg.data)))  # a row per pair and language
    return [dict(r) for r in dsd["eval"].select(range(n))]


def read_prompts_file(path: str | Path) -> list[dict]:
    """A .jsonl (one record per line) or .json (a list of records) file of prompt records."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"prompts file not found: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise EvalError(f"{path}: expected a JSON list of prompt records")
            return data
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON: {e}") from None


def encode_prompt(tokenizer, text: str, data_cfg, lang: str | None = None, context: list[dict] | None = None):
    """Prompt token ids as `clo_fast.data.tokenize_dataset` builds them: template=plain gets the tokenizer's
    special prefix (BOS) before the text; a chat template writes its own, so nothing is added there."""
    prefix = special_prefix(tokenizer) if data_cfg.template == "plain" else []
    text = format_prompt(text, tokenizer, data_cfg, lang, context)
    return prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_item(tokenizer, item: dict, data_cfg) -> list[int]:
    """An evaluation item's prompt ids: its language's system prompt and its conversation context, as in training."""
    return encode_prompt(tokenizer, item["prompt"], data_cfg, item["lang"], item.get("context"))


def _record_items(i: int, rec, targets: list[str]) -> list[dict]:
    """The evaluation items of one prompt record (a dataset row gives two, an item record one)."""
    if not isinstance(rec, dict):
        raise EvalError(f"prompt record {i}: expected a dict, got {type(rec).__name__}")
    rid = str(rec.get("id", i))
    if "prompt_en" in rec or "prompt_tgt" in rec:
        missing = [k for k in ("prompt_en", "prompt_tgt") if not isinstance(rec.get(k), str)]
        if missing:
            raise EvalError(f"prompt record {i} (id {rid}): missing or non-string {', '.join(missing)}")
        rec_lang = normalize_lang(rec.get("target_lang") or targets[0])
        if rec_lang not in targets:
            wanted = f"config data.target_lang {targets[0]!r}" if len(targets) == 1 else f"data.target_langs {targets}"
            raise EvalError(f"prompt record {i} (id {rid}): target_lang {rec_lang!r} not in {wanted}")
        ctx = {side: _context(i, rid, rec, f"context_{side}") for side in ("en", "tgt")}
        return [
            {"id": rid, "lang": lang, "prompt": rec[f"prompt_{side}"], "reference": rec.get(f"response_{side}"),
             "context": ctx[side]}
            for side, lang in (("en", "en"), ("tgt", rec_lang))
        ]  # fmt: skip
    if "prompt" in rec:
        if "lang" not in rec:
            raise EvalError(f"prompt record {i} (id {rid}): has 'prompt' but no 'lang'")
        if not isinstance(rec["prompt"], str):
            raise EvalError(f"prompt record {i} (id {rid}): 'prompt' must be a string")
        ref = rec.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise EvalError(f"prompt record {i} (id {rid}): 'reference' must be a string or null")
        lang, ctx = normalize_lang(rec["lang"]), _context(i, rid, rec, "context")
        return [{"id": rid, "lang": lang, "prompt": rec["prompt"], "reference": ref, "context": ctx}]
    raise EvalError(
        f"prompt record {i}: expected keys prompt_en/prompt_tgt (dataset row) or prompt/lang (item), got {sorted(rec)}"
    )


def _context(i: int, rid: str, rec: dict, field: str) -> list[dict]:
    """Earlier turns of a conversation in `rec[field]`: the dataset's JSON string, or a list of {role, content};
    absent or empty → []."""
    value = rec.get(field)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise EvalError(f"prompt record {i} (id {rid}): field {field!r} is not valid JSON: {e}") from None
    ok = isinstance(value, list) and all(
        isinstance(t, dict) and t.get("role") in CHAT_ROLES and isinstance(t.get("content"), str) for t in value
    )
    if not ok:
        raise EvalError(f"prompt record {i} (id {rid}): field {field!r} must be a list of {{role, content}} turns")
    return value
