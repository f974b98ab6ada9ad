"""The text-level dataset: read, select, translate, pair and split; saved and reused by its config key.

Model-independent: columns id, prompt_en, response_en, prompt_tgt, response_tgt, target_lang
(docs/INTERFACES.md), a DatasetDict with "train" and "eval".
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from clo_fast.atomic import OutputDirError, atomic_directory, check_publishable
from clo_fast.config import DataConfig, validate_data
from clo_fast.constants import WORLD_NAME
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
    if cfg.source == "demo":  # the bundled file changes with the package version
        d["_data"] = hashlib.sha256(demo_data_path().read_bytes()).hexdigest()
    elif cfg.source == WORLD_NAME:  # the world's recipe names its pairs
        from clo_fast.data.world import text_fingerprint

        d["_data"] = text_fingerprint()
    elif looks_local(cfg.source) and os.path.exists(os.path.expanduser(cfg.source)):
        st = os.stat(os.path.expanduser(cfg.source))
        d["_data"] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps(d, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def select_pairs(cfg: DataConfig, skips: BadRecords, filtered: dict) -> tuple[list, int, int, int]:
    """The source pairs a dataset is built from: duplicates of a prompt removed before anything else (so no
    held-out prompt is also trained on), then a seeded order, at most max_examples.
    Returns (selected, records_read, valid_pairs, duplicate_prompts_removed)."""
    pairs, n_records = read_pairs(cfg, skips, filtered)

    def keys(p):  # the English prompt, and the given translation of it, each with its conversation's earlier
        # turns: a copy of either is the same example; the same words after another context are not
        en = ("en", conversation_key(p.context, p.instruction))
        return en, ("tgt", conversation_key(p.context_tgt, p.instruction_tgt)) if p.instruction_tgt else None

    pairs, n_duplicates = deduplicate(pairs, keys)  # before the split
    order = shuffled_order(len(pairs), cfg.seed)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    return [pairs[i] for i in order], n_records, len(pairs), n_duplicates


def translate_sharded(cfg: DataConfig, rank: int, world: int, *, translator: Any = None, progress: bool = True):
    """Fill the shared translation cache with this data config's translations, `world` processes at once and
    without any collective: rank r translates its shard (every world-th pair from r) first, then helps with
    the others' shards from their ends; texts another process has already put in the cache are skipped. So
    W processes translate ≈ W× faster, and a process never waits on another (without a shared cache_dir each
    translates everything). Returns the translator, for `build_text_dataset` (which then finds every text
    cached). A translator without a cache (columns) has nothing to do here.
    """
    from tqdm.auto import tqdm

    from clo_fast.data.translate import make_translator

    validate_data(cfg)
    translator = translator or make_translator(cfg, progress=False)
    if getattr(translator, "cache", None) is None or not hasattr(translator, "translate"):
        return translator
    selected = select_pairs(cfg, BadRecords(cfg.on_bad_record), {})[0]
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
            translator.translate(texts)
            bar.update(len(texts))
    finally:
        bar.close()
    return translator


def build_text_dataset(cfg: DataConfig, *, translator: Any = None, progress: bool = True):
    """Read, select, translate and pair. Returns (DatasetDict{"train","eval"}, summary dict).

    Does not write the dataset (see `save_text_dataset`); the hf translation cache is written as it goes.
    `translator` overrides the one `cfg` asks for (tests).
    """
    import datasets

    from clo_fast.data.translate import make_translator

    validate_data(cfg)
    t0 = time.time()
    skips = BadRecords(cfg.on_bad_record)
    filtered: dict[str, int] = {}
    selected, n_records, n_valid, n_duplicates = select_pairs(cfg, skips, filtered)

    if cfg.max_examples is not None and n_valid < cfg.max_examples:
        warnings.warn(
            f"{cfg.source}: data.max_examples is {cfg.max_examples} but the source has only {n_valid} usable pairs "
            f"(read {n_records} records; skipped: {skips.counts}; filtered: {filtered})",
            stacklevel=2,
        )
    translator = translator or make_translator(cfg, progress=progress)
    translated = translator.translate_pairs(selected, cfg.source_lang, cfg.target_lang) if selected else []
    contexts_tgt = _translated_contexts(selected, translator)
    rows = []
    for p, (ti, tr), ctx in zip(selected, translated, contexts_tgt, strict=False):
        try:
            turns = [("instruction", ti), ("response", tr)] + [
                (f"context turn {i}", t["content"]) for i, t in enumerate(ctx)
            ]
            for fld, v in turns:
                if not isinstance(v, str) or not v.strip():
                    raise DataError(
                        f"{p.where}: field {fld!r}: the {cfg.target_lang} translation is empty", "empty_translation"
                    )
        except DataError as e:
            skips.handle(e)
            continue
        rows.append(
            {
                "id": p.id,
                "prompt_en": p.instruction,
                "response_en": p.response,
                "prompt_tgt": ti.strip(),
                "response_tgt": tr.strip(),
                "target_lang": cfg.target_lang,
                "context_en": json.dumps(p.context or [], ensure_ascii=False),
                "context_tgt": json.dumps(ctx, ensure_ascii=False),
            }
        )

    n = len(rows)
    n_eval = eval_size(n, cfg.eval_fraction)
    feats = _text_features()

    def to_ds(rs):
        return datasets.Dataset.from_dict({c: [r[c] for r in rs] for c in TEXT_COLUMNS}, features=feats)

    if n == 0:
        raise DataError(
            f"{cfg.source}: no usable examples (read {n_records} records; skipped: {skips.counts}; "
            f"filtered: {filtered})",
            "empty_dataset",
        )
    dsd = datasets.DatasetDict({"train": to_ds(rows[n_eval:]), "eval": to_ds(rows[:n_eval])})

    char_lengths = {k: percentiles([len(r[k]) for r in rows]) for k in TEXT_COLUMNS[1:5]}
    summary = {
        "config_key": _config_key(cfg),
        "source": cfg.source,
        "source_format": cfg.source_format,
        "target_lang": cfg.target_lang,
        "translator": cfg.translator,
        "records_read": n_records,
        "duplicate_prompts_removed": n_duplicates,
        "valid_pairs": n_valid,
        "fewer_than_max_examples": cfg.max_examples is not None and n_valid < cfg.max_examples,
        "selected": len(selected),
        "kept": n,
        "train": n - n_eval,
        "eval": n_eval,
        "skipped_bad_records": dict(skips.counts),
        "skipped_examples": list(skips.examples),
        "filtered": filtered,
        "translation": dict(getattr(translator, "stats", {}) or {}),
        "char_lengths": char_lengths,
        "seconds": round(time.time() - t0, 2),
    }
    return dsd, summary


def save_text_dataset(dsd, summary: dict, output_dir: str | os.PathLike) -> Path:
    """save_to_disk under output_dir (written to a temporary folder, then moved) plus summary.json."""
    out = Path(output_dir).expanduser()
    try:  # a folder the user made is refused, never replaced
        with atomic_directory(out, "data", per_process=True) as tmp:  # processes may save the same dataset at once
            dsd.save_to_disk(str(tmp))
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
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
    return dsd, summary
