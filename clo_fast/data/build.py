"""The text-level dataset: read, select, translate, pair and split; saved and reused by its config key.

Model-independent: columns id, prompt_en, response_en, prompt_tgt, response_tgt, target_lang
(docs/INTERFACES.md), a DatasetDict with "train" and "eval".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from clo_fast.atomic import OutputDirError, atomic_directory, check_publishable
from clo_fast.config import DataConfig, source_data_configs, target_languages, validate_data
from clo_fast.constants import WORLD_NAME
from clo_fast.data.quality import REASONS, gate_pairs
from clo_fast.data.sources import BadRecords, DataError, demo_data_path, read_pairs
from clo_fast.data.split import conversation_key, deduplicate, eval_size, shuffled_order
from clo_fast.data.stats import percentiles
from clo_fast.paths import looks_local

TEXT_COLUMNS = (
    "id",
    "prompt_en",
    "response_en",
    "prompt_tgt",
    "response_tgt",
    "target_lang",
    "context_en",  # earlier turns of a conversation, JSON [{role, content}] ("[]" for single-turn data)
    "context_tgt",  # the same turns in the target language
)


REJECTS_FILE = "rejects.jsonl"  # beside the dataset: the pairs the translation quality gate dropped, and why


def _text_features():
    import datasets

    return datasets.Features({c: datasets.Value("string") for c in TEXT_COLUMNS})


def _config_key(cfg: DataConfig) -> str:
    keys = (
        "source",
        "source_format",
        "split",
        "source_config",
        "instruction_field",
        "response_field",
        "source_lang",
        "target_lang",
        "target_langs",
        "max_examples",
        "seed",
        "translator",
        "translation_model",
        "target_instruction_field",
        "target_response_field",
        "translation_max_length",
        "translation_num_beams",
        "eval_fraction",
        "on_bad_record",
        "messages_field",
        "target_messages_field",
        "oasst_all_turns",
    )
    d = {k: getattr(cfg, k) for k in keys}
    d["_dedup"] = "context+prompt+translation,nfkc"  # datasets saved under an older deduplication are rebuilt
    d["_split"] = "before-gate"  # held-out pairs chosen before translation checks (older datasets are rebuilt)
    d["quality"] = dataclasses.asdict(cfg.quality)
    if cfg.sources:
        d["sources"] = [dataclasses.asdict(s) for s in cfg.sources]
        d["_data"] = [_data_fingerprint(u) for u in source_data_configs(cfg)]
    else:
        d["_data"] = _data_fingerprint(cfg)
    blob = json.dumps(d, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _data_fingerprint(cfg: DataConfig) -> Any:
    """What identifies a source's content where its name does not: the bundled file's hash, the world's recipe,
    a local file's size and mtime (a hub dataset: its name and split, already in the key)."""
    if cfg.source == "demo":  # the bundled file changes with the package version
        return hashlib.sha256(demo_data_path().read_bytes()).hexdigest()
    if cfg.source == WORLD_NAME:  # the world's recipe names its pairs
        from clo_fast.data.world import text_fingerprint

        return text_fingerprint()
    if looks_local(cfg.source) and os.path.exists(os.path.expanduser(cfg.source)):
        st = os.stat(os.path.expanduser(cfg.source))
        return [st.st_size, st.st_mtime_ns]
    return None


def _texts_to_translate(p) -> list[str]:
    return [p.instruction, p.response] + [t["content"] for t in p.context or []]


def _translated_contexts(selected: list, translator: Any) -> list[list[dict]]:
    """Every pair's earlier turns in the target language: given by the data, or translated turn by turn."""
    todo = [t["content"] for p in selected if p.context and p.context_tgt is None for t in p.context]
    table = dict(zip(todo, translator.translate(todo), strict=True)) if todo else {}
    out = []
    for p in selected:
        if p.context_tgt is not None or not p.context:
            out.append(p.context_tgt or [])
        else:
            out.append([{"role": t["role"], "content": table[t["content"]].strip()} for t in p.context])
    return out


def _translated_fields(p, row: dict, ctx: list[dict]) -> list[tuple[str, str, str]]:
    """(field name, English text, its translation) of every translated field of a pair: what the gate checks."""
    turns = zip(p.context or [], ctx, strict=True)
    return [("instruction", p.instruction, row["prompt_tgt"]), ("response", p.response, row["response_tgt"])] + [
        (f"context turn {i}", s["content"], t["content"]) for i, (s, t) in enumerate(turns)
    ]


def _read_other_languages(unit: DataConfig, pairs: list, langs: list[str]) -> None:
    """data.target_langs with given translations: each pair's translations into the other languages, read from
    their columns (a record without them: an error naming it, or under on_bad_record=skip a pair without that
    language, counted when the rows are made)."""
    for lang in langs:
        other, _ = read_pairs(dataclasses.replace(unit, target_lang=lang), BadRecords(unit.on_bad_record), {})
        by_where = {q.where: q for q in other}
        for p in pairs:
            q = by_where.get(p.where)
            if q is not None:
                p.translations = {**(p.translations or {}), lang: (q.instruction_tgt, q.response_tgt, q.context_tgt)}


def _in_language(selected: list, lang: str, cfg: DataConfig, skips: BadRecords) -> list:
    """The selected pairs with their given translations into `lang` (the first language: as read)."""
    units = source_data_configs(cfg)
    if lang == target_languages(cfg)[0]:
        return selected
    out = []
    for p in selected:
        if units[p.source_index].translator != "columns":
            out.append(p)
            continue
        given = (p.translations or {}).get(lang)
        if given is None:
            skips.handle(DataError(f"{p.where}: no {lang} translation in the data", "missing_translation"))
            continue
        out.append(dataclasses.replace(p, instruction_tgt=given[0], response_tgt=given[1], context_tgt=given[2]))
    return out


def mix_counts(cfg: DataConfig, available: list[int]) -> list[int | None]:
    """How many pairs each dataset gives (None = all of them): max_examples per source (a single source: data.
    max_examples), or with weights shares of a mix whose size is data.max_examples, else the largest mix that
    every source can give without repeating a pair. Largest remainders make the counts add up to the size."""
    if not cfg.sources:
        return [cfg.max_examples]
    if cfg.sources[0].weight is None:
        return [s.max_examples for s in cfg.sources]
    shares = [s.weight / sum(x.weight for x in cfg.sources) for s in cfg.sources]
    size = min(int(a / w) for a, w in zip(available, shares, strict=True))
    if cfg.max_examples is not None:
        size = min(size, cfg.max_examples)
    counts = [int(size * w) for w in shares]
    by_remainder = sorted(range(len(shares)), key=lambda k: size * shares[k] - counts[k], reverse=True)
    for k in by_remainder[: size - sum(counts)]:
        counts[k] += 1
    return [min(c, a) for c, a in zip(counts, available, strict=True)]


def select_pairs(
    cfg: DataConfig, skips: BadRecords, filtered: dict, mix: list | None = None
) -> tuple[list, int, int, int]:
    """The source pairs a dataset is built from: duplicates of a prompt removed before anything else (so no
    held-out prompt is also trained on; across the datasets of a mix too, the first listed keeps it), then a
    seeded order, at most max_examples (a mix: each dataset its count, `mix_counts`, then one seeded order).
    Returns (selected, records_read, valid_pairs, duplicate_prompts_removed); `mix` receives one dict per dataset.
    """
    units = source_data_configs(cfg)
    pairs, n_records, records = [], 0, []
    for k, unit in enumerate(units):
        got, n = read_pairs(unit, skips, filtered)
        for p in got:
            p.source_index = k
            p.id = p.id if len(units) == 1 else f"{k}/{p.id}"  # ids of two datasets may coincide
        if unit.translator == "columns":
            _read_other_languages(unit, got, target_languages(cfg)[1:])
        pairs += got
        n_records += n
        records.append(n)

    def keys(p):  # the English prompt, and the given translation of it, each with its conversation's earlier
        # turns: a copy of either is the same example; the same words after another context are not
        en = ("en", conversation_key(p.context, p.instruction))
        return en, ("tgt", conversation_key(p.context_tgt, p.instruction_tgt)) if p.instruction_tgt else None

    pairs, n_duplicates = deduplicate(pairs, keys)  # before the split
    by_source = [[p for p in pairs if p.source_index == k] for k in range(len(units))]
    counts = mix_counts(cfg, [len(b) for b in by_source])
    chosen = [[b[i] for i in shuffled_order(len(b), cfg.seed)[:c]] for b, c in zip(by_source, counts, strict=True)]
    selected = chosen[0]
    if len(units) > 1:  # one seeded order over the mix: the held-out share comes from every dataset
        selected = [p for c in chosen for p in c]
        selected = [selected[i] for i in shuffled_order(len(selected), cfg.seed)]
    if mix is not None:
        weights = [None] if not cfg.sources else [s.weight for s in cfg.sources]
        for unit, n, b, c, w in zip(units, records, by_source, chosen, weights, strict=True):
            mix.append(
                {
                    "source": unit.source,
                    "source_format": unit.source_format,
                    "translator": unit.translator,
                    "weight": w,
                    "max_examples": unit.max_examples,
                    "records_read": n,
                    "valid_pairs": len(b),
                    "selected": len(c),
                }
            )
    return selected, n_records, len(pairs), n_duplicates


def _translators(cfg: DataConfig, given: Any, progress: bool) -> dict[tuple[str, str], Any]:
    """One translator per (kind: columns | hf, target language) the run needs; `given` (tests: one translator,
    or a dict keyed by kind or by (kind, language); or what `translate_sharded` returned) serves them."""
    from clo_fast.data.translate import make_translator

    keys = sorted({(u.translator, lang) for u in source_data_configs(cfg) for lang in target_languages(cfg)})
    if isinstance(given, dict):
        return {(k, lang): given.get((k, lang), given.get(k)) for k, lang in keys}
    if given is not None:
        return dict.fromkeys(keys, given)
    return {
        (k, lang): make_translator(
            dataclasses.replace(cfg, translator=k, target_lang=lang, sources=[]), progress=progress
        )
        for k, lang in keys
    }


def translate_sharded(cfg: DataConfig, rank: int, world: int, *, translator: Any = None, progress: bool = True):
    """Fill the shared translation cache with this data config's translations, `world` processes at once and
    without any collective: rank r translates its shard (every world-th pair from r) first, then helps with
    the others' shards from their ends; texts another process has already put in the cache are skipped. So
    W processes translate ≈ W× faster, and a process never waits on another (without a shared cache_dir each
    translates everything). Returns the translators, for `build_text_dataset` (which then finds every text
    cached). A translator without a cache (columns) has nothing to do here.
    """
    from tqdm.auto import tqdm

    validate_data(cfg)
    translators = _translators(cfg, translator, progress=False)
    units = source_data_configs(cfg)
    cached = {key: tr for key, tr in translators.items() if getattr(tr, "cache", None) is not None}
    chosen = select_pairs(cfg, BadRecords(cfg.on_bad_record), {})[0] if cached else []
    for (kind, _lang), tr in cached.items():
        if not hasattr(tr, "translate"):
            continue
        selected = [p for p in chosen if units[p.source_index].translator == kind]
        chunk = max(1, 4 * cfg.translation_batch_size)
        shards = [[t for p in selected[r::world] for t in _texts_to_translate(p)] for r in range(world)]
        work = []  # (shard, chunk) in this rank's order: its own shard forwards, then the others' from their ends
        for k in range(world):
            r = (rank + k) % world
            pieces = [shards[r][i : i + chunk] for i in range(0, len(shards[r]), chunk)]
            work += pieces if k == 0 else pieces[::-1]
        bar = tqdm(
            total=sum(map(len, work)),
            disable=not progress,
            desc=f"translate (rank {rank} of {world})",
            unit="text",
            dynamic_ncols=True,
        )
        try:
            for texts in work:
                tr.translate(texts)
                bar.update(len(texts))
        finally:
            bar.close()
    return translators


def _translate(cfg: DataConfig, selected: list, translators: dict, skips: BadRecords) -> list[tuple]:
    """(pair, row, target-language context) for every selected pair whose cfg.target_lang translation is not
    empty, in order; each dataset's pairs through its own translator."""
    units = source_data_configs(cfg)
    done: dict[int, tuple] = {}
    for (kind, lang), tr in translators.items():
        if lang != cfg.target_lang:
            continue
        group = [p for p in selected if units[p.source_index].translator == kind]
        if group:
            pairs = tr.translate_pairs(group, cfg.source_lang, cfg.target_lang)
            for p, pair, ctx in zip(group, pairs, _translated_contexts(group, tr), strict=True):
                done[id(p)] = (*pair, ctx)
    out = []
    for p in selected:
        ti, tr, ctx = done[id(p)]
        turns = [("instruction", ti), ("response", tr)] + [
            (f"context turn {i}", t["content"]) for i, t in enumerate(ctx)
        ]
        empty = [fld for fld, v in turns if not isinstance(v, str) or not v.strip()]
        if empty:
            err = DataError(
                f"{p.where}: field {empty[0]!r}: the {cfg.target_lang} translation is empty", "empty_translation"
            )
            skips.handle(err)
            continue
        row = {
            "id": p.id,
            "prompt_en": p.instruction,
            "response_en": p.response,
            "prompt_tgt": ti.strip(),
            "response_tgt": tr.strip(),
            "target_lang": cfg.target_lang,
            "context_en": json.dumps(p.context or [], ensure_ascii=False),
            "context_tgt": json.dumps(ctx, ensure_ascii=False),
        }
        out.append((p, row, ctx))
    return out


def _gate(translated: list[tuple], cfg: DataConfig) -> tuple[list[bool], list[dict]]:
    """(kept flags, rejected rows with reason, field, detail and where) under data.quality."""
    fields = [_translated_fields(p, row, ctx) for p, row, ctx in translated]
    verdicts = gate_pairs(fields, [row["target_lang"] for _, row, _ in translated], cfg.quality)
    rejects = [
        {**row, "reason": v.reason, "field": fld, "detail": v.detail, "where": p.where}
        for (p, row, _), found in zip(translated, verdicts, strict=True)
        if found is not None
        for fld, v in [found]
    ]
    return [v is None for v in verdicts], rejects


def _mix_summary(mix: list[dict], kept: list, rejects: list[dict], translated: list[tuple]) -> list[dict]:
    """Each dataset's part of the mix: read, valid, selected, kept (and its share of the kept pairs), rejected."""
    index = {row["id"]: p.source_index for p, row, _ in translated}
    for k, m in enumerate(mix):
        m["kept"] = sum(1 for p, _ in kept if p.source_index == k)
        m["share"] = round(m["kept"] / max(1, len(kept)), 4)
        m["rejected"] = _count_reasons([r for r in rejects if index[r["id"]] == k])
    return mix


def build_text_dataset(cfg: DataConfig, *, translator: Any = None, progress: bool = True):
    """Read, select, translate, gate and pair. Returns (DatasetDict{"train","eval"}, summary dict).

    Does not write the dataset (see `save_text_dataset`); the hf translation cache is written as it goes.
    `translator` overrides the ones `cfg` asks for (tests), or is what `translate_sharded` returned.
    """
    import datasets

    validate_data(cfg)
    t0 = time.time()
    skips = BadRecords(cfg.on_bad_record)
    filtered: dict[str, int] = {}
    mix: list[dict] = []
    selected, n_records, n_valid, n_duplicates = select_pairs(cfg, skips, filtered, mix)
    name = " + ".join(m["source"] for m in mix)
    if cfg.max_examples is not None and n_valid < cfg.max_examples:
        warnings.warn(
            f"{name}: data.max_examples is {cfg.max_examples} but the source has only {n_valid} usable pairs "
            f"(read {n_records} records; skipped: {skips.counts}; filtered: {filtered})",
            stacklevel=2,
        )
    translators = _translators(cfg, translator, progress)
    langs = target_languages(cfg)
    translated = []  # one row per pair and language, pair by pair (the English side shared)
    for lang in langs:
        in_lang = _in_language(selected, lang, cfg, skips)
        translated += _translate(dataclasses.replace(cfg, target_lang=lang), in_lang, translators, skips)
    position = {p.id: i for i, p in enumerate(selected)}
    translated.sort(key=lambda t: (position[t[0].id], langs.index(t[1]["target_lang"])))
    passed, rejects = _gate(translated, cfg)
    # held out: the first pairs of the seeded order, decided before any pair is dropped, so that a gate threshold
    # or a failed translation never moves a prompt from one split to the other; every language of a pair on one side
    held_out = {id(p) for p in selected[: eval_size(len(selected), cfg.eval_fraction)]}
    held_out = {p.id for p in selected if id(p) in held_out}
    kept = [(p, row) for (p, row, _), ok in zip(translated, passed, strict=True) if ok]
    if not kept:
        raise DataError(
            f"{name}: no usable examples (read {n_records} records; skipped: {skips.counts}; "
            f"filtered: {filtered}; rejected by the translation quality gate: {_count_reasons(rejects)})",
            "empty_dataset",
        )
    feats = _text_features()

    def to_ds(rs):
        return datasets.Dataset.from_dict({c: [r[c] for r in rs] for c in TEXT_COLUMNS}, features=feats)

    train_rows = [row for p, row in kept if p.id not in held_out]
    eval_rows = [row for p, row in kept if p.id in held_out]
    dsd = datasets.DatasetDict({"train": to_ds(train_rows), "eval": to_ds(eval_rows)})
    rows = [row for _, row in kept]
    stats = {f"{k}:{lang}": dict(getattr(t, "stats", {}) or {}) for (k, lang), t in translators.items()}
    summary = {
        "config_key": _config_key(cfg),
        "source": name,
        "source_format": cfg.source_format if not cfg.sources else "+".join(m["source_format"] for m in mix),
        "target_lang": cfg.target_lang,
        "target_langs": langs,
        "kept_per_language": {lang: sum(row["target_lang"] == lang for row in rows) for lang in langs},
        "translator": cfg.translator if not cfg.sources else "+".join(sorted({k for k, _ in translators})),
        "records_read": n_records,
        "duplicate_prompts_removed": n_duplicates,
        "valid_pairs": n_valid,
        "fewer_than_max_examples": cfg.max_examples is not None and n_valid < cfg.max_examples,
        "selected": len(selected),
        "kept": len(rows),
        "train": len(train_rows),
        "eval": len(eval_rows),
        "mix": _mix_summary(mix, kept, rejects, translated),
        "skipped_bad_records": dict(skips.counts),
        "skipped_examples": list(skips.examples),
        "filtered": filtered,
        "translation": next(iter(stats.values())) if len(stats) == 1 else stats,
        "quality": {
            "enabled": cfg.quality.enabled,
            "checked": len(translated),
            "rejected": _count_reasons(rejects),
            "rejects_file": REJECTS_FILE,
            "rejects": rejects,  # written to REJECTS_FILE beside the dataset, not into summary.json
        },
        "char_lengths": {k: percentiles([len(r[k]) for r in rows]) for k in TEXT_COLUMNS[1:5]},
        "seconds": round(time.time() - t0, 2),
    }
    return dsd, summary


def _count_reasons(rejects: list[dict]) -> dict[str, int]:
    return {r: n for r in REASONS if (n := sum(x["reason"] == r for x in rejects))}


def saved_summary(summary: dict) -> dict:
    """The summary as summary.json holds it: without the rejected pairs themselves (they are in REJECTS_FILE)."""
    quality = {k: v for k, v in summary.get("quality", {}).items() if k != "rejects"}
    return {**summary, "quality": quality}


def summary_json(summary: dict) -> str:
    return json.dumps(saved_summary(summary), indent=2, ensure_ascii=False)


def rejects_jsonl(summary: dict) -> str:
    """The pairs the quality gate dropped, one JSON object a line: the pair's texts, reason, field, detail, where."""
    rejects = summary.get("quality", {}).get("rejects", [])
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)


def save_text_dataset(dsd, summary: dict, output_dir: str | os.PathLike) -> Path:
    """save_to_disk under output_dir (written to a temporary folder, then moved) plus summary.json and the
    pairs the quality gate dropped (REJECTS_FILE, JSON lines: the pair's texts, the reason, the field, why)."""
    out = Path(output_dir).expanduser()
    try:  # a folder the user made is refused, never replaced
        with atomic_directory(out, "data", per_process=True) as tmp:  # processes may save the same dataset at once
            dsd.save_to_disk(str(tmp))
            (tmp / "summary.json").write_text(summary_json(summary))
            (tmp / REJECTS_FILE).write_text(rejects_jsonl(summary), encoding="utf-8")
    except OutputDirError as e:
        raise DataError(f"data.output_dir: {e}", "output_dir") from None
    return out


def _load_saved(out: Path):
    """The saved DatasetDict; an empty split (eval_fraction 0) is saved without a data file, which
    datasets.load_from_disk cannot read back: it is rebuilt empty with the text features."""
    import datasets

    splits = {}
    for name in json.loads((out / "dataset_dict.json").read_text())["splits"]:
        if any((out / name).glob("*.arrow")):
            splits[name] = datasets.load_from_disk(str(out / name))
        else:
            splits[name] = datasets.Dataset.from_dict({k: [] for k in _text_features()}, features=_text_features())
    return datasets.DatasetDict(splits)


def load_or_build_text_dataset(cfg: DataConfig, *, progress: bool = True):
    """Load the text dataset from cfg.output_dir when it was built from the same data config, else build
    and save it. Returns (DatasetDict, summary)."""

    validate_data(cfg)  # the key reads the parsed data.sources
    out = Path(cfg.output_dir).expanduser()
    sfile = out / "summary.json"
    if sfile.is_file():
        try:
            summary = json.loads(sfile.read_text())
            if summary.get("config_key") == _config_key(cfg):
                return _load_saved(out), summary
        except (OSError, ValueError):
            pass
    try:  # refused before the (possibly long) build, not after it
        check_publishable(out, "output folder", "data")
    except OutputDirError as e:
        raise DataError(f"data.output_dir: {e}", "output_dir") from None
    dsd, summary = build_text_dataset(cfg, progress=progress)
    save_text_dataset(dsd, summary, out)
    return dsd, saved_summary(summary)
