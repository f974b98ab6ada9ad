"""Tokenizing a text split into the four CLO sequences per example, cached on disk (docs/INTERFACES.md)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from clo_fast.atomic import atomic_directory, checksum_problem, write_checksums
from clo_fast.config import ConfigError, DataConfig
from clo_fast.constants import IGNORE_INDEX, SEQUENCE_KINDS
from clo_fast.data.sources import DataError
from clo_fast.data.stats import percentiles

FORMAT_VERSION = 4  # bump when the tokenized layout changes (invalidates the tokenization cache); 3: checksums;
# 4: each example keeps its target_lang (data.target_langs: the batch carries the language)


def system_prompt_for(cfg: DataConfig, lang: str | None) -> str | None:
    """The configured system prompt for `lang`: data.system_prompts[lang], else data.system_prompt, else None."""
    per_lang = getattr(cfg, "system_prompts", None) or {}  # keys normalized by validate_data
    if lang is not None:
        lang = lang.strip().replace("_", "-").split("-")[0].lower()  # `SW`, `sw-KE` → sw, as the keys are
        if lang in per_lang:
            return per_lang[lang]
    return getattr(cfg, "system_prompt", None)


def chat_messages(instruction: str, cfg: DataConfig, lang: str | None = None, context: list[dict] | None = None):
    """The messages of one prompt: a system turn (the conversation's own, else the one configured for `lang`,
    else none), the earlier turns of the conversation, and the user turn."""
    context = list(context or [])
    if not (context and context[0]["role"] == "system"):
        system = system_prompt_for(cfg, lang)
        context = ([{"role": "system", "content": system}] if system is not None else []) + context
    return context + [{"role": "user", "content": instruction}]


def _plain_prompt(instruction: str, cfg: DataConfig, lang: str | None, context: list[dict]) -> str:
    """prompt_template around the instruction; earlier turns before it, each user turn in the template followed
    by its reply and a blank line; a system text (the conversation's or the configured one) first."""
    parts = []
    for m in chat_messages(instruction, cfg, lang, context)[:-1]:
        if m["role"] == "user":
            parts.append(cfg.prompt_template.replace("{instruction}", m["content"]))
        else:  # system text, or an assistant reply
            parts.append(m["content"] + "\n\n")
    return "".join(parts) + cfg.prompt_template.replace("{instruction}", instruction)


def format_prompt(
    instruction: str, tokenizer: Any, cfg: DataConfig, lang: str | None = None, context: list[dict] | None = None
) -> str:
    """The prompt text: cfg.prompt_template (template=plain) or the tokenizer's chat template, with the earlier
    turns of a conversation (`context`) and the system prompt configured for `lang` (data.system_prompts /
    data.system_prompt; none by default)."""
    if cfg.template == "plain":
        return _plain_prompt(instruction, cfg, lang, context or [])
    messages = prompt_messages(instruction, tokenizer, cfg, lang, context)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_messages(
    instruction: str, tokenizer: Any, cfg: DataConfig, lang: str | None = None, context: list[dict] | None = None
) -> list[dict]:
    """template=chat: the messages the chat template renders into the prompt (`chat_messages`, plus an empty
    system turn where the template would otherwise add a system prompt of its own)."""
    _require_chat_template(tokenizer)
    messages = chat_messages(instruction, cfg, lang, context)
    if messages[0]["role"] != "system" and empty_system_removes_default(tokenizer):
        messages = [{"role": "system", "content": ""}] + messages  # no system prompt unless configured
    return messages


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"data.template: 'chat' but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
            "has no chat template (use template: plain)"
        )


# Stand-ins rendered through a chat template to find what the template puts around a turn's content.
_USER_MARK = "CLOUSERMARK"
_ASSISTANT_MARK = "CLOASSISTANTMARK"


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The tokens the chat template closes an assistant turn with (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`,
    `</s>` for templates that end turns with EOS).

    Found by rendering a conversation whose assistant content is a marker and tokenizing what follows the
    marker up to and including its last special token (the whitespace between turns is not part of the turn).
    A template that puts no special token after the assistant content ends responses with EOS.
    """
    _require_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _USER_MARK}, {"role": "assistant", "content": _ASSISTANT_MARK}],
        tokenize=False,
    )
    name = getattr(tokenizer, "name_or_path", "")
    if _ASSISTANT_MARK not in rendered:
        raise ConfigError(f"tokenizer {name!r}: its chat template does not render the assistant's content")
    after = rendered[rendered.rindex(_ASSISTANT_MARK) + len(_ASSISTANT_MARK) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = _special_ids(tokenizer)
    last = max((k for k, t in enumerate(ids) if t in special), default=None)
    if last is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer {name!r} has no EOS token and its chat template no end-of-turn token")
        return [tokenizer.eos_token_id]
    return list(ids[: last + 1])


def _rendered_head(tokenizer: Any, messages: list[dict]) -> str | None:
    """What the chat template renders before the (marker) user turn's content; None if it cannot render it."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that rejects this shape fails later, with its own message, on real data
        return None
    return text[: text.index(_USER_MARK)] if _USER_MARK in text else None


def injected_system_text(tokenizer: Any) -> str | None:
    """What a chat template renders before a lone user turn when that includes a system block it adds by
    itself (Qwen2.5's English default, Llama-3.1's knowledge-date header), or None."""
    head = _rendered_head(tokenizer, [{"role": "user", "content": _USER_MARK}])
    return head if head is not None and "system" in head.lower() else None


_EMPTY_SYSTEM_REMOVES_DEFAULT: dict[tuple, bool] = {}


def empty_system_removes_default(tokenizer: Any) -> bool:
    """True when the template adds a default system prompt that an empty system turn replaces (ChatML
    templates such as Qwen2.5's); False for templates without one, or whose added text stays (Llama-3.1)."""
    key = (getattr(tokenizer, "chat_template", None), getattr(tokenizer, "bos_token", None))
    if key not in _EMPTY_SYSTEM_REMOVES_DEFAULT:
        bare = injected_system_text(tokenizer)
        empty = _rendered_head(tokenizer, [{"role": "system", "content": ""}, {"role": "user", "content": _USER_MARK}])
        _EMPTY_SYSTEM_REMOVES_DEFAULT[key] = bare is not None and empty is not None and len(empty) < len(bare)
    return _EMPTY_SYSTEM_REMOVES_DEFAULT[key]


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before a text (e.g. BOS), found by comparing with/without specials.

    When the two tokenizations do not line up (a tokenizer that also changes the text's first token), the
    prefix is the run of special tokens that the tokenization with specials starts with; when there is none
    and the tokenizer has a BOS token, a warning says the prompts go without it.
    """
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_sp) - len(without) + 1):
        if with_sp[k : k + len(without)] == without:
            return list(with_sp[:k])
    special = _special_ids(tokenizer)
    lead = []
    for t in with_sp:
        if t not in special:
            break
        lead.append(t)
    if not lead and getattr(tokenizer, "bos_token_id", None) is not None:
        warnings.warn(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: cannot tell which tokens it adds before a "
            f"text (with special tokens {with_sp}, without {without}); plain-template prompts go without its "
            f"BOS token {tokenizer.bos_token!r}",
            stacklevel=2,
        )
    return lead


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
    for c in ("id", "prompt_en", "response_en", "prompt_tgt", "response_tgt", "context_en", "context_tgt"):
        for v in ds[c] if c in ds.column_names else []:
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
        [system_prompt_for(cfg, None), dict(sorted((getattr(cfg, "system_prompts", None) or {}).items()))],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def response_end_ids(tokenizer: Any, cfg: DataConfig) -> list[int]:
    """What every response ends with: EOS (template=plain) or the chat template's end-of-turn tokens."""
    if cfg.template == "chat":
        return end_of_turn_ids(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    return [tokenizer.eos_token_id]


def _warn_injected_system(tokenizer: Any, cfg: DataConfig) -> None:
    if cfg.template != "chat" or system_prompt_for(cfg, cfg.target_lang) is not None:
        return
    head = injected_system_text(tokenizer)
    if head is None:
        return
    name = getattr(tokenizer, "name_or_path", "")
    if empty_system_removes_default(tokenizer):
        what = "prompts get an empty system turn instead"
    else:
        what = "it stays in every prompt (an empty system turn does not remove it)"
    warnings.warn(
        f"tokenizer {name!r}: its chat template adds a system prompt of its own when none is given "
        f"({head.strip()[:160]!r}): {what}; set data.system_prompt (and data.system_prompts per language) to "
        "choose one, e.g. in the target language",
        stacklevel=2,
    )


def _encode_pieces(ds, tokenizer: Any, cfg: DataConfig) -> dict[str, list[list[int]]]:
    """Token ids of the four texts of every example: prompts with the special prefix (template=plain),
    responses with EOS (template=plain) or the chat template's end-of-turn tokens appended."""
    end = response_end_ids(tokenizer, cfg)
    prefix = special_prefix(tokenizer) if cfg.template == "plain" else []
    _warn_injected_system(tokenizer, cfg)
    src = getattr(cfg, "source_lang", None)
    tgt_langs = list(ds["target_lang"]) if "target_lang" in ds.column_names else [cfg.target_lang] * len(ds)

    def enc(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    n = len(ds)
    ctx_en = [json.loads(c) for c in ds["context_en"]] if "context_en" in ds.column_names else [[]] * n
    ctx_tgt = [json.loads(c) for c in ds["context_tgt"]] if "context_tgt" in ds.column_names else [[]] * n
    prompts_en = [format_prompt(x, tokenizer, cfg, src, c) for x, c in zip(ds["prompt_en"], ctx_en, strict=True)]
    prompts_tgt = [
        format_prompt(x, tokenizer, cfg, lang, c)
        for x, lang, c in zip(ds["prompt_tgt"], tgt_langs, ctx_tgt, strict=True)
    ]
    return {
        "prompt_en": [prefix + t for t in enc(prompts_en)],
        "prompt_tgt": [prefix + t for t in enc(prompts_tgt)],
        "response_en": [t + end for t in enc(list(ds["response_en"]))],
        "response_tgt": [t + end for t in enc(list(ds["response_tgt"]))],
    }


# (prompt, response) of sequences 0..3, in SEQUENCE_KINDS order
_SEQUENCE_PIECES = (
    ("prompt_en", "response_en"),
    ("prompt_en", "response_tgt"),
    ("prompt_tgt", "response_tgt"),
    ("prompt_tgt", "response_en"),
)


def _pair_sequences(
    ids: list[str], pieces: dict[str, list[list[int]]], max_length: int, langs: list[str]
) -> tuple[dict, dict]:
    """Rows {id, target_lang, input_ids [4], labels [4]} (labels unshifted, IGNORE_INDEX on the prompt), stats."""
    rows: dict[str, list] = {"id": [], "target_lang": [], "input_ids": [], "labels": []}
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
        rows["target_lang"].append(langs[i])
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
    3: (x_tgt, y_en). Each response ends with EOS (template=plain) or the chat template's end-of-turn tokens
    (template=chat); a sequence longer than cfg.max_length keeps the
    prompt and loses the end of the response (EOS included); an example with a prompt that leaves no
    room for a response token is dropped. `stats`, when given, is filled with kept/dropped/truncated
    counts and token-length percentiles per sequence kind.
    """
    import datasets

    target = Path(cfg.cache_dir).expanduser() / "tokenized" / _cache_key(ds, tokenizer, cfg)
    if use_cache and (target / "stats.json").is_file():
        problem = checksum_problem(target)  # verified like a checkpoint: corruption in range would train silently
        if problem:
            raise DataError(
                f"{target}: the tokenized-data cache entry is damaged ({problem}); delete that folder and run "
                "again to rebuild it",
                "tokenized_cache",
            )
        out = datasets.load_from_disk(str(target))
        if stats is not None:
            stats.update(json.loads((target / "stats.json").read_text()), cache_hit=True)
        return out

    langs = list(ds["target_lang"]) if "target_lang" in ds.column_names else [cfg.target_lang] * len(ds)
    rows, st = _pair_sequences(list(ds["id"]), _encode_pieces(ds, tokenizer, cfg), cfg.max_length, langs)
    st["template"] = cfg.template
    int_lists = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    text = datasets.Value("string")
    feats = datasets.Features({"id": text, "target_lang": text, "input_ids": int_lists, "labels": int_lists})
    out = datasets.Dataset.from_dict(rows, features=feats)
    if use_cache and len(out) > 0:  # an empty split is an error for the caller: never cached, never reused
        # several processes may tokenize the same split: each stages its own copy, the first to finish wins
        with atomic_directory(target, "tokenized_cache", per_process=True, replace=False) as tmp:
            out.save_to_disk(str(tmp))
            (tmp / "stats.json").write_text(json.dumps(st, indent=2))
            write_checksums(tmp)
        out = datasets.load_from_disk(str(target))
    if stats is not None:
        stats.update(st, cache_hit=False)
    return out
