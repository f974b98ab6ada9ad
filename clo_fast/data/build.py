"""The text-level dataset: read, select, translate, pair and split; saved and reused by its config key.

Model-independent: columns id, prompt_en, response_en, prompt_tgt, response_tgt, target_lang
(docs/INTERFACES.md), a DatasetDict with "train" and "eval".
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from clo_fast.atomic import OutputDirError, atomic_directory, check_replaceable
from clo_fast.config import DataConfig, validate_data
from clo_fast.data.sources import BadRecords, DataError, demo_data_path, read_pairs
from clo_fast.data.split import deduplicate, eval_size, prompt_key, shuffled_order
from clo_fast.data.stats import percentiles
from clo_fast.paths import looks_local

TEXT_COLUMNS = ("id", "prompt_en", "response_en", "prompt_tgt", "response_tgt", "target_lang")


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
    )
    d = {k: getattr(cfg, k) for k in keys}
    d["_dedup"] = "prompt"  # datasets saved before deduplication are rebuilt
    if cfg.source == "demo":  # the bundled file changes with the package version
        d["_data"] = hashlib.sha256(demo_data_path().read_bytes()).hexdigest()
    elif looks_local(cfg.source) and os.path.exists(os.path.expanduser(cfg.source)):
        st = os.stat(os.path.expanduser(cfg.source))
        d["_data"] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps(d, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    pairs, n_records = read_pairs(cfg, skips, filtered)
    pairs, n_duplicates = deduplicate(pairs, lambda p: prompt_key(p.instruction))  # before the split
    n_valid = len(pairs)
    order = shuffled_order(n_valid, cfg.seed)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    selected = [pairs[i] for i in order]

    translator = translator or make_translator(cfg, progress=progress)
    translated = translator.translate_pairs(selected, cfg.source_lang, cfg.target_lang) if selected else []
    rows = []
    for p, (ti, tr) in zip(selected, translated, strict=False):
        try:
            for fld, v in (("instruction", ti), ("response", tr)):
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
        with atomic_directory(out, per_process=True) as tmp:  # processes may save the same dataset at once
            dsd.save_to_disk(str(tmp))
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    except OutputDirError as e:
        raise DataError(f"data.output_dir: {e}", "output_dir") from None
    return out


def load_or_build_text_dataset(cfg: DataConfig, *, progress: bool = True):
    """Load the text dataset from cfg.output_dir when it was built from the same data config, else build
    and save it. Returns (DatasetDict, summary)."""
    import datasets

    out = Path(cfg.output_dir).expanduser()
    sfile = out / "summary.json"
    if sfile.is_file():
        try:
            summary = json.loads(sfile.read_text())
            if summary.get("config_key") == _config_key(cfg):
                return datasets.load_from_disk(str(out)), summary
        except (OSError, ValueError):
            pass
    try:  # refused before the (possibly long) build, not after it
        check_replaceable(out, "output folder")
    except OutputDirError as e:
        raise DataError(f"data.output_dir: {e}", "output_dir") from None
    dsd, summary = build_text_dataset(cfg, progress=progress)
    save_text_dataset(dsd, summary, out)
    return dsd, summary
