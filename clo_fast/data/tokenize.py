"""Tokenizing a text split into the four CLO sequences per example, cached on disk (docs/INTERFACES.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from clo_fast.atomic import atomic_directory
from clo_fast.config import ConfigError, DataConfig
from clo_fast.constants import IGNORE_INDEX, SEQUENCE_KINDS
from clo_fast.data.stats import percentiles

FORMAT_VERSION = 1  # bump when the tokenized layout changes (invalidates the tokenization cache)


def format_prompt(instruction: str, tokenizer: Any, cfg: DataConfig) -> str:
    """The prompt text: cfg.prompt_template (template=plain) or the tokenizer's chat template."""
    if cfg.template == "plain":
        return cfg.prompt_template.replace("{instruction}", instruction)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"data.template: 'chat' but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
            "has no chat template (use template: plain)"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before a text (e.g. BOS), found by comparing with/without specials."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_sp) - len(without) + 1):
        if with_sp[k : k + len(without)] == without:
            return list(with_sp[:k])
    return []


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything about a tokenizer that changes token ids: vocabulary, merges, special tokens, template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    for attr in ("chat_template", "eos_token_id", "bos_token_id", "pad_token_id"):
        h.update(repr(getattr(tokenizer, attr, None)).encode())
    h.update(repr(special_prefix(tokenizer)).encode())
    return h.hexdigest()


def _dataset_key(ds) -> str:
    h = hashlib.sha256()
    for c in ("id", "prompt_en", "response_en", "prompt_tgt", "response_tgt"):
        for v in ds[c]:
            h.update(v.encode())
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()


def _cache_key(ds, tokenizer: Any, cfg: DataConfig) -> str:
    plain_template = cfg.prompt_template if cfg.template == "plain" else None
    parts = [
        FORMAT_VERSION,
        _dataset_key(ds),
        tokenizer_fingerprint(tokenizer),
        cfg.template,
        plain_template,
        cfg.max_length,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _encode_pieces(ds, tokenizer: Any, cfg: DataConfig) -> dict[str, list[list[int]]]:
    """Token ids of the four texts of every example: prompts with the special prefix (template=plain),
    responses with EOS appended."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    prefix = special_prefix(tokenizer) if cfg.template == "plain" else []

    def enc(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    return {
        "prompt_en": [prefix + t for t in enc([format_prompt(x, tokenizer, cfg) for x in ds["prompt_en"]])],
        "prompt_tgt": [prefix + t for t in enc([format_prompt(x, tokenizer, cfg) for x in ds["prompt_tgt"]])],
        "response_en": [t + [eos] for t in enc(list(ds["response_en"]))],
        "response_tgt": [t + [eos] for t in enc(list(ds["response_tgt"]))],
    }


# (prompt, response) of sequences 0..3, in SEQUENCE_KINDS order
_SEQUENCE_PIECES = (
    ("prompt_en", "response_en"),
    ("prompt_en", "response_tgt"),
    ("prompt_tgt", "response_tgt"),
    ("prompt_tgt", "response_en"),
)


def _pair_sequences(ids: list[str], pieces: dict[str, list[list[int]]], max_length: int) -> tuple[dict, dict]:
    """Rows {id, input_ids [4], labels [4]} (labels unshifted, IGNORE_INDEX on the prompt) and their stats."""
    rows: dict[str, list] = {"id": [], "input_ids": [], "labels": []}
    dropped = {"prompt_too_long": 0}
    truncated = [0] * len(SEQUENCE_KINDS)
    lengths: dict[str, list[int]] = {k: [] for k in SEQUENCE_KINDS}
    raw: dict[str, list[int]] = {name: [] for name in ("prompt_en", "prompt_tgt", "response_en", "response_tgt")}
    for i, ex_id in enumerate(ids):
        if max(len(pieces["prompt_en"][i]), len(pieces["prompt_tgt"][i])) >= max_length:
            dropped["prompt_too_long"] += 1
            continue
        ids4, lab4 = [], []
        for k, (p_name, r_name) in enumerate(_SEQUENCE_PIECES):
            p, r = pieces[p_name][i], pieces[r_name][i]
            ids4.append((p + r)[:max_length])
            lab4.append(([IGNORE_INDEX] * len(p) + r)[:max_length])
            truncated[k] += len(p) + len(r) > max_length
            lengths[SEQUENCE_KINDS[k]].append(len(ids4[-1]))
        for name, per_example in raw.items():
            per_example.append(len(pieces[name][i]))
        rows["id"].append(ex_id)
        rows["input_ids"].append(ids4)
        rows["labels"].append(lab4)
    stats = {
        "examples": len(ids),
        "kept": len(rows["id"]),
        "dropped": dropped,
        "truncated": dict(zip(SEQUENCE_KINDS, truncated, strict=True)),
        "max_length": max_length,
        "token_lengths": {k: percentiles(v) for k, v in lengths.items()},
        "token_lengths_before_truncation": {k: percentiles(v) for k, v in raw.items()},
    }
    return rows, stats


def tokenize_dataset(ds, tokenizer: Any, cfg: DataConfig, *, stats: dict | None = None, use_cache: bool = True):
    """Tokenize a text split into the four CLO sequences; cached under cfg.cache_dir/tokenized/.

    Returns a `datasets.Dataset` with columns `id`, `input_ids` (4 lists of int) and `labels` (4 lists,
    IGNORE_INDEX on prompt tokens, unshifted), in the order 0: (x_en, y_en) 1: (x_en, y_tgt) 2: (x_tgt, y_tgt)
    3: (x_tgt, y_en). Each response ends with EOS; a sequence longer than cfg.max_length keeps the
    prompt and loses the end of the response (EOS included); an example with a prompt that leaves no
    room for a response token is dropped. `stats`, when given, is filled with kept/dropped/truncated
    counts and token-length percentiles per sequence kind.
    """
    import datasets

    target = Path(cfg.cache_dir).expanduser() / "tokenized" / _cache_key(ds, tokenizer, cfg)
    if use_cache and (target / "stats.json").is_file():
        out = datasets.load_from_disk(str(target))
        if stats is not None:
            stats.update(json.loads((target / "stats.json").read_text()), cache_hit=True)
        return out

    rows, st = _pair_sequences(list(ds["id"]), _encode_pieces(ds, tokenizer, cfg), cfg.max_length)
    st["template"] = cfg.template
    int_lists = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    feats = datasets.Features({"id": datasets.Value("string"), "input_ids": int_lists, "labels": int_lists})
    out = datasets.Dataset.from_dict(rows, features=feats)
    if use_cache:
        # several processes may tokenize the same split: each stages its own copy, the first to finish wins
        with atomic_directory(target, per_process=True, replace=False) as tmp:
            out.save_to_disk(str(tmp))
            (tmp / "stats.json").write_text(json.dumps(st, indent=2))
        out = datasets.load_from_disk(str(target))
    if stats is not None:
        stats.update(st, cache_hit=False)
    return out
