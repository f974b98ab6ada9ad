"""Cross-lingual dataset builder: English SFT data -> translation -> paired CLO examples.

Three steps, each usable on its own:

1. `build_text_dataset(cfg)` reads the source (bundled demo, a HF dataset, a local json/jsonl/parquet/csv
   file, or oasst1 message trees), selects `max_examples` with a seed, translates (columns | hf) and
   returns a model-independent `DatasetDict{"train","eval"}` with columns
   id, prompt_en, response_en, prompt_tgt, response_tgt, target_lang (saved under `cfg.output_dir`).
2. `tokenize_dataset(ds, tokenizer, cfg)` turns each example into the four sequences of DESIGN.md §1
   (0: x_en+y_en, 1: x_en+y_tgt, 2: x_tgt+y_tgt, 3: x_tgt+y_en), labels on response tokens only,
   cached on disk under `cfg.cache_dir`.
3. `collate_clo(examples, pad_token_id)` pads a batch and shifts the labels.

Command line: `python -m clo_fast.data --config configs/<run>.yaml` (console script `clo-fast-data`).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from clo_fast.config import ConfigError, DataConfig

__all__ = [
    "DataError",
    "SEQUENCE_KINDS",
    "TEXT_COLUMNS",
    "Pair",
    "read_pairs",
    "build_text_dataset",
    "save_text_dataset",
    "load_or_build_text_dataset",
    "format_prompt",
    "tokenize_dataset",
    "collate_clo",
    "demo_data_path",
    "main",
]

SEQUENCE_KINDS = ("en_en", "en_tgt", "tgt_tgt", "tgt_en")  # (prompt lang, response lang), DESIGN.md §1 order
TEXT_COLUMNS = ("id", "prompt_en", "response_en", "prompt_tgt", "response_tgt", "target_lang")
DEMO_FILE = "demo_en_ko_sw.jsonl"
DEMO_LANGS = ("ko", "sw")
_FORMAT_VERSION = 1  # bump when the tokenized layout changes (invalidates the tokenization cache)


class DataError(ValueError):
    """Bad input data; the message names the file (or dataset), the record and the field.

    `reason` is a short key used for the summary's skip counts (missing_field, non_string_field,
    empty_text, malformed_line, not_an_object, ...).
    """

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Pair:
    """One English source pair (and, for translator=columns, its given translation)."""

    id: str
    instruction: str
    response: str
    where: str  # "file: line 3" / "dataset 'x' split 'train': record 7" — used in error messages
    instruction_tgt: str | None = None
    response_tgt: str | None = None


class _Skips:
    """Applies on_bad_record: raise (error) or count by reason (skip), keeping a few example messages."""

    def __init__(self, mode: str):
        self.mode = mode
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    def handle(self, err: DataError) -> None:
        if self.mode != "skip":
            raise err
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(str(err))


# ------------------------------------------------------------------------------------- reading
def demo_data_path():
    """The bundled demo file (an importlib.resources Traversable; works from a wheel too)."""
    from importlib.resources import files

    return files("clo_fast").joinpath("demo_data").joinpath(DEMO_FILE)


_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def _looks_local(source: str) -> bool:
    return (source.lower().endswith(_LOCAL_SUFFIXES) or source.startswith((".", "/", "~"))
            or os.path.exists(os.path.expanduser(source)))


def _iter_records(cfg: DataConfig, skips: _Skips) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for every record of the source; malformed lines go through `skips`."""
    src = cfg.source
    if src == "demo":
        name = f"<bundled demo>/{DEMO_FILE}"
        yield from _iter_jsonl_text(demo_data_path().read_text(encoding="utf-8"), name, skips)
        return
    if _looks_local(src) and not Path(src).expanduser().is_dir():  # a folder goes to datasets.load_dataset
        path = Path(src).expanduser()
        if not path.is_file():
            raise DataError(f"{src}: data file not found", "missing_file")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _iter_jsonl_text(path.read_text(encoding="utf-8"), str(path), skips)
        elif suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                # JSON Lines saved as .json is common: read it line by line (errors name the line)
                yield from _iter_jsonl_text(text, str(path), skips)
                return
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)",
                                    "bad_file")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}", "bad_file")
            for i, rec in enumerate(data):
                yield f"{path}: record {i}", rec
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, rec in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path}: record {i}", rec
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                i = 0
                for rec in reader:
                    yield f"{path}: record {i} (line {reader.line_num})", rec
                    i += 1
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .parquet or .csv)",
                            "bad_file")
        return
    # a Hugging Face dataset name
    import datasets

    try:
        name = os.path.expanduser(src) if os.path.isdir(os.path.expanduser(src)) else src
        ds = datasets.load_dataset(name, cfg.source_config, split=cfg.split)
    except Exception as e:  # noqa: BLE001 - re-raised with the name
        raise DataError(f"dataset {src!r} (split {cfg.split!r}): cannot load: {e}", "missing_file") from e
    where = f"dataset {src!r} split {cfg.split!r}"
    for i, rec in enumerate(ds):
        yield f"{where}: record {i}", rec


def _iter_jsonl_text(text: str, name: str, skips: _Skips) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            skips.handle(DataError(f"{name}: line {n}: malformed JSON ({e.msg} at column {e.colno})",
                                   "malformed_line"))
            continue
        yield f"{name}: line {n}", rec


def _text_field(rec: Any, fld: str, where: str) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record is not an object (got {type(rec).__name__})", "not_an_object")
    if fld not in rec or rec[fld] is None:
        have = ", ".join(sorted(map(str, rec))[:20])
        raise DataError(f"{where}: field {fld!r}: missing (record has: {have})", "missing_field")
    v = rec[fld]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {fld!r}: expected a string, got {type(v).__name__}", "non_string_field")
    if not v.strip():
        raise DataError(f"{where}: field {fld!r}: empty or whitespace-only text", "empty_text")
    return v.strip()


def _target_fields(cfg: DataConfig) -> tuple[str, str]:
    return (cfg.target_instruction_field.replace("{lang}", cfg.target_lang),
            cfg.target_response_field.replace("{lang}", cfg.target_lang))


def read_pairs(cfg: DataConfig, skips: _Skips | None = None, filtered: dict | None = None) -> tuple[list[Pair], int]:
    """All valid English pairs of the source (plus given translations for translator=columns).

    Returns (pairs, records_read). Bad records raise DataError, or are counted in `skips` when
    cfg.on_bad_record == "skip"; oasst filtering (non-English roots, no ranked reply) counts in `filtered`.
    """
    skips = skips or _Skips(cfg.on_bad_record)
    filtered = {} if filtered is None else filtered
    records = list(_iter_records(cfg, skips))
    if cfg.source_format == "oasst":
        return _oasst_pairs(records, cfg, skips, filtered), len(records)
    columns = cfg.translator == "columns"
    ti, tr = _target_fields(cfg)
    pairs = []
    for k, (where, rec) in enumerate(records):
        try:
            p = Pair(
                id=str(rec["id"]) if isinstance(rec, dict) and rec.get("id") not in (None, "") else f"{k:06d}",
                instruction=_text_field(rec, cfg.instruction_field, where),
                response=_text_field(rec, cfg.response_field, where),
                where=where,
            )
            if columns:
                p.instruction_tgt = _text_field(rec, ti, where)
                p.response_tgt = _text_field(rec, tr, where)
        except DataError as e:
            skips.handle(e)
            continue
        pairs.append(p)
    return pairs, len(records)


def _oasst_pairs(records: list[tuple[str, Any]], cfg: DataConfig, skips: _Skips, filtered: dict) -> list[Pair]:
    """English root prompts with their best-ranked (lowest rank, normally 0) assistant reply.

    Accepts the flat message table of `OpenAssistant/oasst1` (message_id, parent_id, role, text, lang,
    rank, deleted, review_result) and the nested tree export (records with a "prompt" holding "replies").
    """
    def bump(key: str) -> None:
        filtered[key] = filtered.get(key, 0) + 1

    def usable(msg: dict) -> bool:
        return not msg.get("deleted", False) and msg.get("review_result", True) is not False

    trees: list[tuple[str, dict, list[dict]]] = []  # (where, root, replies)
    nested = bool(records) and isinstance(records[0][1], dict) and isinstance(records[0][1].get("prompt"), dict)
    if nested:
        for where, rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), dict):
                skips.handle(DataError(f"{where}: field 'prompt': missing or not a message object", "missing_field"))
                continue
            root = rec["prompt"]
            trees.append((where, root, [r for r in root.get("replies") or [] if isinstance(r, dict)]))
    else:
        children: dict[str, list[dict]] = {}
        roots: list[tuple[str, dict]] = []
        for where, rec in records:
            if not isinstance(rec, dict):
                skips.handle(DataError(f"{where}: record is not an object (got {type(rec).__name__})", "not_an_object"))
                continue
            if "message_id" not in rec:
                skips.handle(DataError(f"{where}: field 'message_id': missing (is this oasst data?)", "missing_field"))
                continue
            rec = dict(rec, _where=where)
            if rec.get("parent_id") in (None, ""):
                roots.append((where, rec))
            else:
                children.setdefault(str(rec["parent_id"]), []).append(rec)
        trees = [(w, r, children.get(str(r["message_id"]), [])) for w, r in roots]
    pairs = []
    for where, root, replies in trees:
        if root.get("role", "prompter") != "prompter" or not usable(root):
            bump("oasst_unusable_root")
            continue
        if root.get("lang", cfg.source_lang) != cfg.source_lang:
            bump("oasst_other_language")
            continue
        ranked = [r for r in replies if r.get("role", "assistant") == "assistant" and usable(r)
                  and isinstance(r.get("rank"), (int, float))]
        if not ranked:
            bump("oasst_no_ranked_reply")
            continue
        best = min(ranked, key=lambda r: r["rank"])
        try:
            instr = _text_field(root, "text", where)
            resp = _text_field(best, "text", best.get("_where", f"{where}: best reply"))
        except DataError as e:
            skips.handle(e)
            continue
        rid = root.get("message_id") or root.get("message_tree_id") or f"{len(pairs):06d}"
        pairs.append(Pair(id=str(rid), instruction=instr, response=resp, where=where))
    return pairs


# ---------------------------------------------------------------------------------- text build
def _check_cfg(cfg: DataConfig) -> None:
    def bad(name: str, msg: str) -> ConfigError:
        return ConfigError(f"data.{name}: {msg}")

    if cfg.translator not in ("columns", "hf"):
        raise bad("translator", f"must be columns|hf, got {cfg.translator!r}")
    if cfg.source_format not in ("pairs", "oasst"):
        raise bad("source_format", f"must be pairs|oasst, got {cfg.source_format!r}")
    if cfg.on_bad_record not in ("error", "skip"):
        raise bad("on_bad_record", f"must be error|skip, got {cfg.on_bad_record!r}")
    if cfg.template not in ("plain", "chat"):
        raise bad("template", f"must be plain|chat, got {cfg.template!r}")
    if cfg.template == "plain" and "{instruction}" not in cfg.prompt_template:
        raise bad("prompt_template", "must contain {instruction}")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise bad("max_examples", f"must be >= 1 or null, got {cfg.max_examples}")
    if cfg.translator == "columns" and cfg.source_format == "oasst":
        raise bad("translator", "oasst data carries no translations: use translator=hf")
    if cfg.source == "demo" and cfg.translator == "columns" and cfg.target_lang not in DEMO_LANGS:
        raise bad("target_lang", f"the bundled demo data has translations for {', '.join(DEMO_LANGS)} only, "
                  f"got {cfg.target_lang!r} (use translator=hf for other languages)")
    if cfg.source_lang == cfg.target_lang:
        raise bad("target_lang", f"equals source_lang ({cfg.source_lang!r})")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise bad("eval_fraction", "must be in [0, 1)")


def _percentiles(values: Sequence[int]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(p: float) -> int:
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {"n": len(v), "min": v[0], "p50": q(50), "p90": q(90), "p99": q(99), "max": v[-1],
            "mean": round(sum(v) / len(v), 1)}


def _text_features():
    import datasets

    return datasets.Features({c: datasets.Value("string") for c in TEXT_COLUMNS})


def _config_key(cfg: DataConfig) -> str:
    keys = ("source", "source_format", "split", "source_config", "instruction_field", "response_field",
            "source_lang", "target_lang", "max_examples", "seed", "translator", "translation_model",
            "target_instruction_field", "target_response_field", "translation_max_length",
            "translation_num_beams", "eval_fraction", "on_bad_record")
    d = {k: getattr(cfg, k) for k in keys}
    if cfg.source == "demo":  # the bundled file changes with the package version
        d["_data"] = hashlib.sha256(demo_data_path().read_bytes()).hexdigest()
    elif _looks_local(cfg.source) and os.path.exists(os.path.expanduser(cfg.source)):
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

    from clo_fast.translation import make_translator

    _check_cfg(cfg)
    t0 = time.time()
    skips = _Skips(cfg.on_bad_record)
    filtered: dict[str, int] = {}
    pairs, n_records = read_pairs(cfg, skips, filtered)
    n_valid = len(pairs)
    order = list(range(n_valid))
    random.Random(cfg.seed).shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    selected = [pairs[i] for i in order]

    translator = translator or make_translator(cfg, progress=progress)
    translated = translator.translate_pairs(selected, cfg.source_lang, cfg.target_lang) if selected else []
    rows = []
    for p, (ti, tr) in zip(selected, translated):
        try:
            for fld, v in (("instruction", ti), ("response", tr)):
                if not isinstance(v, str) or not v.strip():
                    raise DataError(f"{p.where}: field {fld!r}: the {cfg.target_lang} translation is empty",
                                    "empty_translation")
        except DataError as e:
            skips.handle(e)
            continue
        rows.append({"id": p.id, "prompt_en": p.instruction, "response_en": p.response,
                     "prompt_tgt": ti.strip(), "response_tgt": tr.strip(), "target_lang": cfg.target_lang})

    n = len(rows)
    n_eval = int(round(n * cfg.eval_fraction))
    if cfg.eval_fraction > 0 and n >= 2:
        n_eval = min(max(1, n_eval), n - 1)
    feats = _text_features()

    def to_ds(rs):
        return datasets.Dataset.from_dict({c: [r[c] for r in rs] for c in TEXT_COLUMNS}, features=feats)

    if n == 0:
        raise DataError(f"{cfg.source}: no usable examples (read {n_records} records; skipped: {skips.counts}; "
                        f"filtered: {filtered})", "empty_dataset")
    dsd = datasets.DatasetDict({"train": to_ds(rows[n_eval:]), "eval": to_ds(rows[:n_eval])})

    char_lengths = {k: _percentiles([len(r[k]) for r in rows]) for k in TEXT_COLUMNS[1:5]}
    summary = {
        "config_key": _config_key(cfg),
        "source": cfg.source, "source_format": cfg.source_format, "target_lang": cfg.target_lang,
        "translator": cfg.translator,
        "records_read": n_records, "valid_pairs": n_valid, "selected": len(selected),
        "kept": n, "train": n - n_eval, "eval": n_eval,
        "skipped_bad_records": dict(skips.counts), "skipped_examples": list(skips.examples),
        "filtered": filtered,
        "translation": dict(getattr(translator, "stats", {}) or {}),
        "char_lengths": char_lengths,
        "seconds": round(time.time() - t0, 2),
    }
    return dsd, summary


def save_text_dataset(dsd, summary: dict, output_dir: str | os.PathLike) -> Path:
    """save_to_disk under output_dir (written to a temporary folder, then moved) plus summary.json."""
    out = Path(output_dir).expanduser()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    dsd.save_to_disk(str(tmp))
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
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
    dsd, summary = build_text_dataset(cfg, progress=progress)
    save_text_dataset(dsd, summary, out)
    return dsd, summary


# ---------------------------------------------------------------------------------- tokenizing
def format_prompt(instruction: str, tokenizer: Any, cfg: DataConfig) -> str:
    """The prompt text: cfg.prompt_template (template=plain) or the tokenizer's chat template."""
    if cfg.template == "plain":
        return cfg.prompt_template.replace("{instruction}", instruction)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.template: 'chat' but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
                          "has no chat template (use template: plain)")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before a text (e.g. BOS), found by comparing with/without specials."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_sp) - len(without) + 1):
        if with_sp[k : k + len(without)] == without:
            return list(with_sp[:k])
    return []


def _tokenizer_key(tokenizer: Any) -> str:
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


def tokenize_dataset(ds, tokenizer: Any, cfg: DataConfig, *, stats: dict | None = None, use_cache: bool = True):
    """Tokenize a text split into the four CLO sequences; cached under cfg.cache_dir/tokenized/.

    Returns a `datasets.Dataset` with columns `id`, `input_ids` (4 lists of int) and `labels` (4 lists,
    -100 on prompt tokens, unshifted), in the order 0: (x_en, y_en) 1: (x_en, y_tgt) 2: (x_tgt, y_tgt)
    3: (x_tgt, y_en). Each response ends with EOS; a sequence longer than cfg.max_length keeps the
    prompt and loses the end of the response (EOS included); an example with a prompt that leaves no
    room for a response token is dropped. `stats`, when given, is filled with kept/dropped/truncated
    counts and token-length percentiles per sequence kind.
    """
    import datasets

    key = hashlib.sha256(json.dumps([
        _FORMAT_VERSION, _dataset_key(ds), _tokenizer_key(tokenizer), cfg.template,
        cfg.prompt_template if cfg.template == "plain" else None, cfg.max_length,
    ]).encode()).hexdigest()[:24]
    cache_root = Path(cfg.cache_dir).expanduser() / "tokenized"
    target = cache_root / key
    if use_cache and (target / "stats.json").is_file():
        out = datasets.load_from_disk(str(target))
        if stats is not None:
            stats.update(json.loads((target / "stats.json").read_text()), cache_hit=True)
        return out

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    prefix = special_prefix(tokenizer) if cfg.template == "plain" else []
    prompts_en = [format_prompt(x, tokenizer, cfg) for x in ds["prompt_en"]]
    prompts_tgt = [format_prompt(x, tokenizer, cfg) for x in ds["prompt_tgt"]]

    def enc(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    p_en = [prefix + t for t in enc(prompts_en)]
    p_tgt = [prefix + t for t in enc(prompts_tgt)]
    r_en = [t + [eos] for t in enc(list(ds["response_en"]))]
    r_tgt = [t + [eos] for t in enc(list(ds["response_tgt"]))]
    L = cfg.max_length
    rows: dict[str, list] = {"id": [], "input_ids": [], "labels": []}
    dropped = {"prompt_too_long": 0}
    truncated = [0, 0, 0, 0]
    lengths: dict[str, list[int]] = {k: [] for k in SEQUENCE_KINDS}
    raw = {"prompt_en": [], "prompt_tgt": [], "response_en": [], "response_tgt": []}
    for i, ex_id in enumerate(ds["id"]):
        seqs = ((p_en[i], r_en[i]), (p_en[i], r_tgt[i]), (p_tgt[i], r_tgt[i]), (p_tgt[i], r_en[i]))
        if max(len(p_en[i]), len(p_tgt[i])) >= L:
            dropped["prompt_too_long"] += 1
            continue
        ids4, lab4 = [], []
        for k, (p, r) in enumerate(seqs):
            ids = (p + r)[:L]
            lab = ([-100] * len(p) + r)[:L]
            truncated[k] += len(p) + len(r) > L
            ids4.append(ids)
            lab4.append(lab)
            lengths[SEQUENCE_KINDS[k]].append(len(ids))
        for name, v in (("prompt_en", p_en[i]), ("prompt_tgt", p_tgt[i]), ("response_en", r_en[i]),
                        ("response_tgt", r_tgt[i])):
            raw[name].append(len(v))
        rows["id"].append(ex_id)
        rows["input_ids"].append(ids4)
        rows["labels"].append(lab4)
    feats = datasets.Features({
        "id": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "labels": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    })
    out = datasets.Dataset.from_dict(rows, features=feats)
    st = {
        "examples": len(ds), "kept": len(rows["id"]), "dropped": dropped,
        "truncated": dict(zip(SEQUENCE_KINDS, truncated)), "max_length": L, "template": cfg.template,
        "token_lengths": {k: _percentiles(v) for k, v in lengths.items()},
        "token_lengths_before_truncation": {k: _percentiles(v) for k, v in raw.items()},
    }
    if use_cache:
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = cache_root / f".{key}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        out.save_to_disk(str(tmp))
        (tmp / "stats.json").write_text(json.dumps(st, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        out = datasets.load_from_disk(str(target))
    if stats is not None:
        stats.update(st, cache_hit=False)
    return out


# ------------------------------------------------------------------------------------ batching
def collate_clo(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int = 64) -> dict:
    """Pad a list of tokenized examples into one CLO batch (docs/INTERFACES.md).

    Row 4b+k = example b, sequence k. Right padding. `labels` are shifted: labels[r, t] is the token
    position t predicts (input_ids[r, t+1]) when that is a response token, else -100.
    `response_tokens` [B,4] counts the response tokens of each sequence; `ref_logps` [B,4] float32 is
    included when every example has it.
    """
    import torch

    if not examples:
        raise ValueError("collate_clo: empty batch")
    rows_ids, rows_lab = [], []
    for b, ex in enumerate(examples):
        if len(ex["input_ids"]) != 4 or len(ex["labels"]) != 4:
            raise ValueError(f"collate_clo: example {b} must hold 4 sequences, got {len(ex['input_ids'])}")
        for k in range(4):
            ids, lab = list(ex["input_ids"][k]), list(ex["labels"][k])
            if len(ids) != len(lab):
                raise ValueError(f"collate_clo: example {b} sequence {k}: input_ids and labels lengths differ")
            rows_ids.append(ids)
            rows_lab.append(lab)
    longest = max(len(r) for r in rows_ids)
    m = max(1, int(pad_to_multiple_of or 1))
    T = max(m, -(-longest // m) * m)
    R = len(rows_ids)
    input_ids = torch.full((R, T), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((R, T), dtype=torch.long)
    labels = torch.full((R, T), -100, dtype=torch.long)
    for r, (ids, lab) in enumerate(zip(rows_ids, rows_lab)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids, dtype=torch.long)
        attention[r, :n] = 1
        if n > 1:
            labels[r, : n - 1] = torch.tensor(lab[1:], dtype=torch.long)
    response_tokens = (labels != -100).sum(dim=1).view(-1, 4)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
             "response_tokens": response_tokens}
    if all(ex.get("ref_logps") is not None for ex in examples):
        batch["ref_logps"] = torch.tensor([list(ex["ref_logps"]) for ex in examples], dtype=torch.float32)
    return batch


# ------------------------------------------------------------------------------------- command
def _summary_tokenizer(run: Any, explicit: str | None):
    """A tokenizer for the token-length summary and the tokenization cache: --tokenizer, else the run's
    model (`demo` resolves to the built demo model through clo_fast.model when available)."""
    name = explicit or run.model.name_or_path
    try:
        from clo_fast.model import load_tokenizer  # noqa: PLC0415 - pad-token handling, demo model
    except Exception:  # noqa: BLE001 - the data builder does not need the model module
        load_tokenizer = None
    if load_tokenizer is not None:
        if explicit:
            return load_tokenizer(explicit)
        return load_tokenizer(run.model, run.data.cache_dir)
    if name == "demo":
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _print_summary(summary: dict, tok_stats: dict | None, out: Path) -> None:
    p = print
    p(f"\nclo-fast data: {summary['source']} ({summary['source_format']}) -> {summary['target_lang']} "
      f"via {summary['translator']}  [{summary['seconds']} s]")
    p(f"  records read {summary['records_read']}, valid pairs {summary['valid_pairs']}, "
      f"selected {summary['selected']}, kept {summary['kept']} (train {summary['train']}, eval {summary['eval']})")
    if summary["skipped_bad_records"]:
        p(f"  skipped bad records: {summary['skipped_bad_records']}")
        for e in summary["skipped_examples"][:5]:
            p(f"    e.g. {e}")
    if summary["filtered"]:
        p(f"  filtered (oasst): {summary['filtered']}")
    tr = summary.get("translation") or {}
    if tr.get("backend") == "hf":
        p(f"  translation: {tr['texts']} texts, cache hits {tr['cache_hits']}, newly translated {tr['translated']} "
          f"({tr['pieces_translated']} pieces in {tr['model_calls']} model calls, "
          f"piece cache hits {tr['piece_cache_hits']})")
    if tok_stats:
        for split, st in tok_stats.items():
            p(f"  tokenized {split}: kept {st['kept']}/{st['examples']}, dropped {st['dropped']}, "
              f"truncated {st['truncated']} (max_length {st['max_length']}, cache hit {st['cache_hit']})")
        p("  token lengths (train, after truncation):  kind      p50   p90   p99   max")
        for k, v in tok_stats["train"]["token_lengths"].items():
            if v.get("n"):
                p(f"{'':44}{k:8} {v['p50']:5} {v['p90']:5} {v['p99']:5} {v['max']:5}")
    else:
        p("  character lengths (not tokenized; token lengths need a tokenizer):  p50   p90   max")
        for k, v in summary["char_lengths"].items():
            p(f"{'':4}{k:14} {v['p50']:6} {v['p90']:6} {v['max']:6}")
    p(f"  saved to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m clo_fast.data --config configs/run.yaml [--tokenizer NAME] [--set data.key=value ...]`."""
    import yaml

    from clo_fast.config import RunConfig, load_config, parse_dataclass
    from clo_fast.translation import TranslationError

    ap = argparse.ArgumentParser(prog="clo-fast-data", description="Build a cross-lingual CLO dataset.")
    ap.add_argument("--config", help="run config YAML (its `data:` section is used); defaults when omitted")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set data.target_lang=sw (repeatable)")
    ap.add_argument("--tokenizer", help="tokenizer (path or hub name) for the tokenization cache and token-length stats "
                    "(default: the config's model; 'demo' = the built demo model)")
    ap.add_argument("--no-tokenize", action="store_true", help="build the text dataset only")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.set:
        if "=" not in kv:
            ap.error(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    try:
        if args.config:
            run = load_config(args.config, overrides)
        else:
            raw: dict = {}
            for dotted, value in overrides.items():
                node = raw
                *parents, leaf = dotted.split(".")
                for q in parents:
                    node = node.setdefault(q, {})
                node[leaf] = value
            run = parse_dataclass(RunConfig, raw, "<command line>").validate("<command line>")
        cfg = run.data
        dsd, summary = build_text_dataset(cfg, progress=not args.no_progress)
        out = save_text_dataset(dsd, summary, cfg.output_dir)
        tok_stats = None
        if not args.no_tokenize:
            tok = _summary_tokenizer(run, args.tokenizer)
            if tok is not None:
                tok_stats = {}
                for split in ("train", "eval"):
                    st: dict = {}
                    tokenize_dataset(dsd[split], tok, cfg, stats=st)
                    tok_stats[split] = st
                summary["tokenized"] = tok_stats
                (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    except (DataError, ConfigError, TranslationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(summary, tok_stats, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
