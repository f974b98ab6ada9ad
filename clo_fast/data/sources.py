"""Reading the English source: the bundled demo, a HF dataset, a local json/jsonl/parquet/csv file or folder,
or oasst1 message trees, into `Pair`s. Bad records raise `DataError` or are counted (data.on_bad_record)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clo_fast.config import DataConfig
from clo_fast.constants import MAX_RECORD_TEXT_CHARS, WORLD_NAME
from clo_fast.paths import looks_local

DEMO_FILE = "demo_en_ko_sw.jsonl"


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
    context: list[dict] | None = None  # earlier turns [{role, content}] (system first, if any): conversations
    context_tgt: list[dict] | None = None  # the same turns in the target language, when the data has them
    source_index: int = 0  # which dataset of data.sources it came from (0 for a single source)
    # data.target_langs with translator=columns: the other languages' given (instruction, response, context)
    translations: dict | None = None


class BadRecords:
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


def _iter_records(cfg: DataConfig, skips: BadRecords) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for every record of the source; malformed lines go through `skips`."""
    src = cfg.source
    if src == "demo":
        name = f"<bundled demo>/{DEMO_FILE}"
        yield from _iter_jsonl_text(demo_data_path().read_text(encoding="utf-8"), name, skips)
    elif src == WORLD_NAME:  # the miniature fact world's fine-tuning pairs (generated, deterministic)
        from clo_fast.data.world import build_entities, finetune_pairs

        for i, rec in enumerate(finetune_pairs(build_entities())):
            yield f"<world>: pair {i}", rec
    elif looks_local(src) and not Path(src).expanduser().is_dir():  # a folder goes to datasets.load_dataset
        yield from _iter_local_file(Path(src).expanduser(), src, skips)
    else:
        yield from _iter_hub_dataset(cfg)


def _iter_local_file(path: Path, src: str, skips: BadRecords) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise DataError(f"{src}: data file not found", "missing_file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl_bytes(path.read_bytes(), str(path), skips)
    elif suffix == ".json":
        yield from _iter_json_file(path, skips)
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pyarrow.ArrowException, OSError) as e:  # not a parquet file (a renamed text file, a torn copy)
            raise DataError(f"{path}: not a readable parquet file ({e})", "bad_file") from None
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}: record {i}", rec
    elif suffix == ".csv":
        import io

        with io.StringIO(_decode_whole(path), newline="") as f:
            reader = csv.DictReader(f)
            for i, rec in enumerate(reader):
                yield f"{path}: record {i} (line {reader.line_num})", rec
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .parquet or .csv)", "bad_file")


def _decode_whole(path: Path) -> str:
    """A file that is one document (csv, json array): a decoding error names the line; it cannot be skipped."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8",
            "bad_encoding",
        ) from None


def _iter_json_file(path: Path, skips: BadRecords) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        # JSON Lines saved as .json is common: read it line by line (errors name the line)
        yield from _iter_jsonl_bytes(raw, str(path), skips)
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)", "bad_file")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}", "bad_file")
    for i, rec in enumerate(data):
        yield f"{path}: record {i}", rec


DATA_FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


def _check_one_file_type(folder: Path) -> None:
    """datasets.load_dataset reads a folder's most common file type and silently skips the others: refuse a
    folder whose data files are of several types instead of training on part of it."""
    kinds: dict[str, str] = {}
    for f in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in f.relative_to(folder).parts)
        if f.is_file() and f.suffix.lower() in DATA_FILE_TYPES and not hidden:
            kinds.setdefault(f.suffix.lower(), f.name)
    if len(kinds) > 1:
        found = ", ".join(f"{k} (e.g. {name})" for k, name in kinds.items())
        raise DataError(
            f"{folder}: data files of several types ({found}); the loader would read one type and skip the "
            "others: keep one type in the folder, or name one file as data.source",
            "bad_file",
        )


def _iter_hub_dataset(cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """A Hugging Face dataset name (or a local dataset folder), loaded with datasets.load_dataset."""
    import datasets

    src = cfg.source
    if os.path.isdir(os.path.expanduser(src)):
        _check_one_file_type(Path(src).expanduser())
    try:
        name = os.path.expanduser(src) if os.path.isdir(os.path.expanduser(src)) else src
        ds = datasets.load_dataset(name, cfg.source_config, split=cfg.split)
    except Exception as e:  # any failure of the loader: re-raised with the name
        raise DataError(f"dataset {src!r} (split {cfg.split!r}): cannot load: {e}", "missing_file") from e
    where = f"dataset {src!r} split {cfg.split!r}"
    for i, rec in enumerate(ds):
        yield f"{where}: record {i}", rec


def _iter_jsonl_bytes(raw: bytes, name: str, skips: BadRecords) -> Iterator[tuple[str, Any]]:
    """JSON Lines decoded line by line: a line that is not UTF-8 is a bad record naming file and line."""
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.handle(
                DataError(
                    f"{name}: line {n}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})",
                    "bad_encoding",
                )
            )
            continue
        for _, rec in _iter_jsonl_text(text, name, skips, first_line=n):
            yield f"{name}: line {n}", rec


def _iter_jsonl_text(text: str, name: str, skips: BadRecords, first_line: int = 1) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), start=first_line):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            skips.handle(DataError(f"{name}: line {n}: malformed JSON ({e.msg} at column {e.colno})", "malformed_line"))
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
    _check_size(v, where, repr(fld))
    return v.strip()


def _check_size(text: str, where: str, field: str) -> None:
    """A text over MAX_RECORD_TEXT_CHARS is a bad record, refused before it reaches translation or tokenization."""
    if len(text) > MAX_RECORD_TEXT_CHARS:
        raise DataError(
            f"{where}: field {field}: {len(text):,} characters, over the limit of {MAX_RECORD_TEXT_CHARS:,} for one "
            "text (constants.MAX_RECORD_TEXT_CHARS); shorten or drop the record, or set data.on_bad_record: skip",
            "too_long",
        )


def _target_fields(cfg: DataConfig) -> tuple[str, str]:
    return (
        cfg.target_instruction_field.replace("{lang}", cfg.target_lang),
        cfg.target_response_field.replace("{lang}", cfg.target_lang),
    )


def read_pairs(
    cfg: DataConfig, skips: BadRecords | None = None, filtered: dict | None = None
) -> tuple[list[Pair], int]:
    """All valid English pairs of the source (plus given translations for translator=columns).

    Returns (pairs, records_read). Bad records raise DataError, or are counted in `skips` when
    cfg.on_bad_record == "skip"; oasst filtering (non-English roots, no ranked reply) counts in `filtered`.
    """
    skips = skips or BadRecords(cfg.on_bad_record)
    filtered = {} if filtered is None else filtered
    records = list(_iter_records(cfg, skips))
    if cfg.source_format == "oasst":
        oasst = _oasst_all_turn_pairs if cfg.oasst_all_turns else _oasst_pairs
        return oasst(records, cfg, skips, filtered), len(records)
    if cfg.source_format == "messages":
        return _messages_pairs(records, cfg, skips), len(records)
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


def _oasst_pairs(records: list[tuple[str, Any]], cfg: DataConfig, skips: BadRecords, filtered: dict) -> list[Pair]:
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
        ranked = [
            r
            for r in replies
            if r.get("role", "assistant") == "assistant" and usable(r) and isinstance(r.get("rank"), (int, float))
        ]
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


# --------------------------------------------------------------------------------- conversations
CHAT_ROLES = ("system", "user", "assistant")


def _turns(rec: Any, fld: str, where: str) -> list[dict]:
    """A conversation [{role, content}, ...]: an optional system turn first, then user and assistant turns in
    turn, ending with the assistant turn that is the response."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record is not an object (got {type(rec).__name__})", "not_an_object")
    turns = rec.get(fld)
    if turns is None:
        have = ", ".join(sorted(map(str, rec))[:20])
        raise DataError(f"{where}: field {fld!r}: missing (record has: {have})", "missing_field")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {fld!r}: expected a non-empty list of turns", "bad_conversation")
    out = []
    for i, t in enumerate(turns):
        at = f"{where}: field {fld!r}[{i}]"
        if not isinstance(t, dict) or t.get("role") not in CHAT_ROLES:
            got = t.get("role") if isinstance(t, dict) else type(t).__name__
            raise DataError(f"{at}: expected {{role: system|user|assistant, content}}, got {got!r}", "bad_conversation")
        content = t.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{at}: 'content' must be a non-empty string", "empty_text")
        _check_size(content, where, f"{fld!r}[{i}] content")
        out.append({"role": t["role"], "content": content.strip()})
    body = out[1:] if out[0]["role"] == "system" else out
    roles = [t["role"] for t in body]
    expected = ["user", "assistant"] * (len(body) // 2)
    if len(body) < 2 or roles != expected:
        raise DataError(
            f"{where}: field {fld!r}: turns must be an optional system turn, then user/assistant turns in turn ending "
            f"with an assistant turn (got roles {[t['role'] for t in out]})",
            "bad_conversation",
        )
    return out


def _messages_pairs(records: list[tuple[str, Any]], cfg: DataConfig, skips: BadRecords) -> list[Pair]:
    """TRL-style conversational records: the last assistant turn is the response, the user turn before it the
    instruction, the earlier turns (system included) the context. With translator=columns the target-language
    conversation (target_messages_field) must have the same roles."""
    columns = cfg.translator == "columns"
    tgt_field = cfg.target_messages_field.replace("{lang}", cfg.target_lang)
    pairs = []
    for k, (where, rec) in enumerate(records):
        try:
            turns = _turns(rec, cfg.messages_field, where)
            p = Pair(
                id=str(rec["id"]) if rec.get("id") not in (None, "") else f"{k:06d}",
                instruction=turns[-2]["content"],
                response=turns[-1]["content"],
                where=where,
                context=turns[:-2],
            )
            if columns:
                tgt = _turns(rec, tgt_field, where)
                if [t["role"] for t in tgt] != [t["role"] for t in turns]:
                    raise DataError(
                        f"{where}: field {tgt_field!r}: its roles differ from {cfg.messages_field!r}'s",
                        "bad_conversation",
                    )
                p.instruction_tgt, p.response_tgt, p.context_tgt = tgt[-2]["content"], tgt[-1]["content"], tgt[:-2]
        except DataError as e:
            skips.handle(e)
            continue
        pairs.append(p)
    return pairs


def _oasst_all_turn_pairs(
    records: list[tuple[str, Any]], cfg: DataConfig, skips: BadRecords, filtered: dict
) -> list[Pair]:
    """Every usable prompter message of an English tree with its best-ranked assistant reply; the turns above it
    (along the path from the root) are the context. Flat oasst1 message tables only."""

    def bump(key: str) -> None:
        filtered[key] = filtered.get(key, 0) + 1

    def usable(msg: dict) -> bool:
        return not msg.get("deleted", False) and msg.get("review_result", True) is not False

    by_id: dict[str, dict] = {}
    children: dict[str, list[dict]] = {}
    for where, rec in records:
        if not isinstance(rec, dict) or "message_id" not in rec:
            skips.handle(
                DataError(
                    f"{where}: field 'message_id': missing (oasst_all_turns needs the flat oasst1 message table)",
                    "missing_field",
                )
            )
            continue
        rec = dict(rec, _where=where)
        by_id[str(rec["message_id"])] = rec
        if rec.get("parent_id") not in (None, ""):
            children.setdefault(str(rec["parent_id"]), []).append(rec)
    pairs = []
    for mid, msg in by_id.items():
        if msg.get("role") != "prompter" or not usable(msg):
            continue
        if msg.get("lang", cfg.source_lang) != cfg.source_lang:
            bump("oasst_other_language")
            continue
        ranked = [
            r
            for r in children.get(mid, [])
            if r.get("role") == "assistant" and usable(r) and isinstance(r.get("rank"), (int, float))
        ]
        if not ranked:
            bump("oasst_no_ranked_reply")
            continue
        best = min(ranked, key=lambda r: r["rank"])
        path, node, broken = [], msg, False
        while node.get("parent_id") not in (None, ""):
            node = by_id.get(str(node["parent_id"]))
            if node is None or not usable(node):
                broken = True
                break
            path.append(node)
        if broken:
            bump("oasst_broken_thread")
            continue
        try:
            context = [
                {"role": "user" if m.get("role") == "prompter" else "assistant", "content": _text_field(m, "text", w)}
                for m in reversed(path)
                for w in [m["_where"]]
            ]
            instr = _text_field(msg, "text", msg["_where"])
            resp = _text_field(best, "text", best["_where"])
        except DataError as e:
            skips.handle(e)
            continue
        pairs.append(Pair(id=mid, instruction=instr, response=resp, where=msg["_where"], context=context))
    return pairs
