"""Translation of English instruction data into the target language, with a crash-safe disk cache.

Two backends sit behind one small interface (`translate_pairs`):

- `ColumnsTranslator` — the translations are already in the data (read by `clo_fast.data`);
- `HFTranslator` — any Hugging Face seq2seq translation model (M2M100, NLLB, Marian). Texts are cut
  into pieces the model can handle (fenced code blocks and inline code kept verbatim, one piece per
  line, long lines split at sentence boundaries), pieces are translated in length-sorted batches, and
  the translations are reassembled with the original layout.

Every piece and every whole text the model translates is stored in `TranslationCache` (sqlite, one
transaction per batch) keyed by (model, source language, target language, text): an interrupted run
keeps every finished batch, and a rerun sends only what is missing to the model.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from clo_fast import language_id
from clo_fast.data.language_codes import FLORES_CODES, ISO1_FROM_FLORES, marian_candidates

__all__ = [
    "TranslationError",
    "UnknownLanguageError",
    "TranslationCache",
    "Translator",
    "ColumnsTranslator",
    "HFTranslator",
    "make_translator",
    "resolve_language_codes",
    "segment_text",
]


class TranslationError(ValueError):
    """Translation cannot run as configured (bad model, bad language, ...)."""


class UnknownLanguageError(TranslationError, language_id.UnknownLanguageError):
    """A language code is not known to the chosen translation model (a translation error, and the same kind of
    error as an unknown code anywhere else: `except clo_fast.language_id.UnknownLanguageError` catches both)."""


# ------------------------------------------------------------------------------------------ cache
class TranslationCache:
    """Translations on disk, keyed by (model, src, tgt, text); sqlite, so a killed run never corrupts it.

    `put_many` commits one transaction: after it returns the rows survive Ctrl-C or a crash, and a
    transaction cut short is rolled back by sqlite on the next open.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open(timeout_s=60.0)
        except sqlite3.DatabaseError as e:  # not a database, or damaged: say which file, keep it for the user
            raise TranslationError(
                f"{self.path}: the translation cache cannot be read ({e}); move it aside (the translations in it "
                "are then redone) or point data.cache_dir elsewhere"
            ) from None

    def _open(self, timeout_s: float) -> sqlite3.Connection:
        """Connect and set up; ranks open the shared cache at the same moment, and switching it to WAL (or
        creating the table) can meet "database is locked" before sqlite's busy timeout applies: retried."""
        deadline = time.monotonic() + timeout_s
        while True:
            db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS translations (model TEXT NOT NULL, src TEXT NOT NULL,"
                    " tgt TEXT NOT NULL, text TEXT NOT NULL, translation TEXT NOT NULL, created REAL NOT NULL,"
                    " PRIMARY KEY (model, src, tgt, text))"
                )
                return db
            except sqlite3.OperationalError as e:
                db.close()
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get_many(self, model: str, src: str, tgt: str, texts: Iterable[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        texts = list(dict.fromkeys(texts))
        for i in range(0, len(texts), 500):
            chunk = texts[i : i + 500]
            q = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT text, translation FROM translations WHERE model=? AND src=? AND tgt=? AND text IN ({q})",
                (model, src, tgt, *chunk),
            )
            out.update(rows.fetchall())
        return out

    def put_many(self, model: str, src: str, tgt: str, items: Iterable[tuple[str, str]]) -> None:
        now = time.time()
        rows = [(model, src, tgt, t, tr, now) for t, tr in items]
        if not rows:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT OR REPLACE INTO translations VALUES (?,?,?,?,?,?)", rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        self._db.close()


# -------------------------------------------------------------------------------------- interface
class Translator(Protocol):
    """What `clo_fast.data` needs from a translation backend.

    `pairs` are objects with `.instruction` and `.response` (English) and, for the columns backend,
    `.instruction_tgt` / `.response_tgt`. Returns one (instruction_tgt, response_tgt) per pair.
    `stats` is a dict reported in the build summary (cache hits, model calls, ...).
    """

    name: str
    stats: dict

    def translate_pairs(self, pairs: Sequence[Any], src: str, tgt: str) -> list[tuple[str, str]]: ...


class ColumnsTranslator:
    """The translations are already in the data (fields named in the config)."""

    name = "columns"

    def __init__(self) -> None:
        self.stats: dict = {"backend": "columns"}

    def translate_pairs(self, pairs: Sequence[Any], src: str, tgt: str) -> list[tuple[str, str]]:
        out = []
        for p in pairs:
            if p.instruction_tgt is None or p.response_tgt is None:
                raise TranslationError(f"{p.where}: no translation columns read for this record (translator=columns)")
            out.append((p.instruction_tgt, p.response_tgt))
        return out


# ------------------------------------------------------------------------------- language codes
def model_family(tokenizer: Any) -> str:
    """m2m100 | nllb | marian, from the tokenizer class (NLLB checkpoints use the m2m_100 model type)."""
    name = type(tokenizer).__name__.lower()
    for fam in ("nllb", "m2m100", "marian"):
        if fam in name:
            return fam
    raise TranslationError(
        f"unsupported translation model family (tokenizer class {type(tokenizer).__name__}); "
        "supported: M2M100, NLLB, Marian"
    )


def resolve_language_codes(family: str, src: str, tgt: str, tokenizer: Any, model_name: str = "") -> dict:
    """Map our language codes (ISO 639-1, or the model's own codes) to what `family` expects.

    Returns {"src": code, "tgt": code, "forced_bos_token_id": int | None, "prefix": str}; raises
    UnknownLanguageError naming the model and the code when the model does not know a language.
    """

    def unknown(code: str, which: str, known: Sequence[str]) -> UnknownLanguageError:
        sample = ", ".join(sorted(known)[:40])
        return UnknownLanguageError(
            f"translation model {model_name or family!r} ({family}) does not know {which} language {code!r}; "
            f"it knows: {sample}{' ...' if len(known) > 40 else ''}"
        )

    if family in ("m2m100", "nllb"):
        if family == "m2m100":  # ISO 639-1 codes ("sw"), token ids through get_lang_id
            known = list(getattr(tokenizer, "lang_code_to_id", {}) or {})
            table, token_id = ISO1_FROM_FLORES, tokenizer.get_lang_id
        else:  # FLORES-200 codes ("swh_Latn"), which are tokens of the vocabulary
            known = [t for t in tokenizer.get_vocab() if re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", t)]
            table, token_id = FLORES_CODES, tokenizer.convert_tokens_to_ids
        codes = {}
        for which, code in (("source", src), ("target", tgt)):
            codes[which] = table.get(code, code)
            if codes[which] not in known:
                raise unknown(code, which, known)
        return {
            "src": codes["source"],
            "tgt": codes["target"],
            "prefix": "",
            "forced_bos_token_id": token_id(codes["target"]),
        }
    if family == "marian":
        supported = list(getattr(tokenizer, "supported_language_codes", None) or [])
        if supported:  # multi-target model: the target is chosen by a ">>xxx<<" prefix
            for c in marian_candidates(tgt):
                if f">>{c}<<" in supported:
                    return {"src": src, "tgt": c, "prefix": f">>{c}<< ", "forced_bos_token_id": None}
            raise unknown(tgt, "target", [s[2:-2] for s in supported])
        # single-pair model: the pair is in the name, e.g. Helsinki-NLP/opus-mt-en-sw
        m = re.search(r"opus-mt-(?:tc-big-)?([A-Za-z_]+)-([A-Za-z_]+)", str(model_name))
        if m:
            if m.group(1) not in marian_candidates(src):
                raise unknown(src, "source", [m.group(1)])
            if m.group(2) not in marian_candidates(tgt):
                raise unknown(tgt, "target", [m.group(2)])
        return {"src": src, "tgt": tgt, "prefix": "", "forced_bos_token_id": None}
    raise TranslationError(f"unknown translation model family {family!r}")


# ----------------------------------------------------------------------------------- segmentation
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)[^`\n]+?\1")
_LINE_PREFIX = re.compile(r"^(\s*(?:#{1,6}\s+|>\s*)?(?:[-*+•]\s+|\d+[.)]\s+|[a-zA-Z][.)]\s+)?)")
_SENT_SPLIT = re.compile(r"(?<=[.!?。！？])(\s+)")
_PLACEHOLDER = "[[{}]]"


def segment_text(text: str) -> list[tuple[str, str]]:
    """Split `text` into ("code", s) parts kept verbatim and ("prose", s) parts to translate.

    Fenced code blocks (``` or ~~~, an unterminated fence runs to the end) are code. Prose is cut into
    lines; each line's indentation, list/heading marker and trailing whitespace stay verbatim ("code"),
    and lines without letters are verbatim too. Joining all parts gives back `text` exactly.
    """
    parts: list[tuple[str, str]] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m:
            fence = m.group(1)
            j = i + 1
            while j < len(lines) and not lines[j].lstrip(" \t").startswith(fence):
                j += 1
            parts.append(("code", "".join(lines[i : j + 1])))
            i = j + 1
            continue
        line = lines[i]
        body = line.rstrip()
        trail = line[len(body) :]
        prefix = _LINE_PREFIX.match(body).group(1)
        core = body[len(prefix) :]
        if prefix:
            parts.append(("code", prefix))
        if core and re.search(r"[^\W\d_]", _INLINE_CODE.sub("", core)):
            parts.append(("prose", core))
        elif core:
            parts.append(("code", core))
        if trail:
            parts.append(("code", trail))
        i += 1
    # merge neighbouring verbatim parts
    merged: list[tuple[str, str]] = []
    for kind, s in parts:
        if merged and kind == "code" and merged[-1][0] == "code":
            merged[-1] = ("code", merged[-1][1] + s)
        else:
            merged.append((kind, s))
    return merged


def _protect_inline(s: str) -> tuple[str, list[str]]:
    codes: list[str] = []

    def sub(m: re.Match) -> str:
        codes.append(m.group(0))
        return _PLACEHOLDER.format(len(codes) - 1)

    if "[[" in s:  # our placeholder syntax already occurs: do not mix the two
        return s, []
    return _INLINE_CODE.sub(sub, s), codes


def _restore_inline(translated: str, codes: list[str]) -> str | None:
    for k, code in enumerate(codes):
        ph = _PLACEHOLDER.format(k)
        if translated.count(ph) != 1:
            return None
        translated = translated.replace(ph, code)
    return translated


def _split_long(s: str, max_tokens: int, count_tokens) -> list[str]:
    """Cut `s` at sentence boundaries (then at spaces) into pieces of at most `max_tokens` tokens."""
    if count_tokens(s) <= max_tokens:
        return [s]
    bits = _SENT_SPLIT.split(s)  # sentence, sep, sentence, sep, ...
    sentences = [bits[k] + (bits[k + 1] if k + 1 < len(bits) else "") for k in range(0, len(bits), 2)]
    units: list[str] = []
    for sent in sentences:
        if count_tokens(sent) <= max_tokens:
            units.append(sent)
            continue
        words = re.split(r"(?<=\s)", sent)  # keeps the spaces
        cur = ""
        for w in words:
            if cur and count_tokens(cur + w) > max_tokens:
                units.append(cur)
                cur = ""
            cur += w
        if cur:
            units.append(cur)
    pieces: list[str] = []
    cur = ""
    for u in units:
        if cur and count_tokens(cur + u) > max_tokens:
            pieces.append(cur)
            cur = ""
        cur += u
    if cur:
        pieces.append(cur)
    return [p.strip() for p in pieces if p.strip()]


# ----------------------------------------------------------------------------------- hf backend
class HFTranslator:
    """A Hugging Face seq2seq translation model with the disk cache in front of it.

    `model_calls` counts `generate` batches (tests check that a cached rerun makes none).
    """

    def __init__(
        self,
        model_name: str,
        src: str,
        tgt: str,
        *,
        cache: TranslationCache | None,
        batch_size: int = 16,
        max_length: int = 512,
        num_beams: int = 4,
        device: str = "auto",
        dtype: str = "auto",
        progress: bool = True,
    ):
        from transformers import AutoTokenizer

        self.model_name = model_name
        self.cache = cache
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length)
        self.num_beams = int(num_beams)
        self.progress = progress
        self.src, self.tgt = src, tgt
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        except Exception as e:  # any failure of the loader: re-raised with the model named
            raise TranslationError(f"cannot load the tokenizer of translation model {model_name!r}: {e}") from e
        self.family = model_family(self.tokenizer)
        self.codes = resolve_language_codes(self.family, src, tgt, self.tokenizer, model_name)
        self._device_arg, self._dtype_arg = device, dtype
        self._model = None
        # cache key: the model plus the decoding setting that changes its output
        self.name = f"{model_name}|beams={self.num_beams}"
        self.model_calls = 0
        self.stats: dict = {
            "backend": "hf",
            "model": model_name,
            "texts": 0,
            "cache_hits": 0,
            "translated": 0,
            "pieces_translated": 0,
            "piece_cache_hits": 0,
            "model_calls": 0,
            "inline_code_fallbacks": 0,
        }

    # -- model -----------------------------------------------------------------------------------
    def _load_model(self):
        if self._model is not None:
            return self._model
        import torch
        from transformers import AutoModelForSeq2SeqLM

        dev = self._device_arg
        if dev == "auto":
            dev = (
                "cuda"
                if torch.cuda.is_available()
                else ("mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
            )
        dt = self._dtype_arg
        if dt == "auto":
            if dev.startswith("cuda"):
                dt = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                dt = "float32"
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(self.model_name, dtype=getattr(torch, dt))
        except Exception as e:
            raise TranslationError(f"cannot load translation model {self.model_name!r}: {e}") from e
        self._model = model.to(dev).eval()
        self.device = dev
        return self._model

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(self.codes["prefix"] + text, add_special_tokens=True)["input_ids"])

    def _generate(self, texts: list[str]) -> list[str]:
        """One model call on a batch of short prose pieces."""
        import torch

        model = self._load_model()
        tok = self.tokenizer
        if self.family in ("m2m100", "nllb"):
            tok.src_lang = self.codes["src"]
        enc = tok(
            [self.codes["prefix"] + t for t in texts],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        in_len = int(enc["input_ids"].shape[1])
        kwargs = {"num_beams": self.num_beams, "max_new_tokens": min(self.max_length, 2 * in_len + 16)}
        if self.codes["forced_bos_token_id"] is not None:
            kwargs["forced_bos_token_id"] = self.codes["forced_bos_token_id"]
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        self.model_calls += 1
        self.stats["model_calls"] = self.model_calls
        drop = self._drop_ids()
        rows = [[i for i in row.tolist() if i not in drop] for row in out]
        return [s.strip() for s in tok.batch_decode(rows, skip_special_tokens=True)]

    def _drop_ids(self) -> set[int]:
        """Special and language-code token ids, removed before decoding (M2M100 language tokens are not
        'special' to every tokenizer version, and must never reach the text)."""
        if not hasattr(self, "_drop"):
            tok = self.tokenizer
            ids = set(getattr(tok, "all_special_ids", []) or [])
            ids |= set((getattr(tok, "lang_code_to_id", None) or {}).values())
            if self.family == "nllb":
                ids |= {i for t, i in tok.get_vocab().items() if re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", t)}
            self._drop = ids
        return self._drop

    # -- pieces ----------------------------------------------------------------------------------
    def _translate_pieces(self, pieces: Iterable[str]) -> dict[str, str]:
        """Translate distinct pieces: cache first, the rest in length-sorted batches, each committed."""
        pieces = list(dict.fromkeys(pieces))
        done = self.cache.get_many(self.name, self.src, self.tgt, pieces) if self.cache is not None else {}
        self.stats["piece_cache_hits"] += len(done)
        todo = sorted((p for p in pieces if p not in done), key=len, reverse=True)
        if not todo:
            return done
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"translate {self.src}->{self.tgt}", unit="piece", disable=not self.progress)
        try:
            for i in range(0, len(todo), self.batch_size):
                batch = todo[i : i + self.batch_size]
                res = self._generate(batch)
                if self.cache is not None:
                    self.cache.put_many(self.name, self.src, self.tgt, zip(batch, res, strict=False))
                done.update(zip(batch, res, strict=False))
                self.stats["pieces_translated"] += len(batch)
                bar.update(len(batch))
        finally:
            bar.close()
        return done

    def translate(self, texts: Sequence[str]) -> list[str]:
        """Translate whole texts (any length, markdown and code allowed); same order as `texts`."""
        uniq = list(dict.fromkeys(texts))
        self.stats["texts"] += len(uniq)
        done = self.cache.get_many(self.name, self.src, self.tgt, uniq) if self.cache is not None else {}
        self.stats["cache_hits"] += len(done)
        todo = [t for t in uniq if t not in done]
        if todo:
            limit = max(8, self.max_length - 4)  # room for language/special tokens
            plans: dict[str, list] = {}
            for t in todo:
                plan = []
                for kind, s in segment_text(t):
                    if kind == "code":
                        plan.append(("code", s))
                        continue
                    for k, piece in enumerate(_split_long(s, limit, self.count_tokens)):
                        if k:
                            plan.append(("code", " "))
                        prot, codes = _protect_inline(piece)
                        plan.append(("piece", prot, codes, piece))
                plans[t] = plan
            first = self._translate_pieces(p[1] for plan in plans.values() for p in plan if p[0] == "piece")
            # pieces whose inline-code placeholders did not survive: translate the text around the code
            fallback: list[str] = []
            for plan in plans.values():
                for p in plan:
                    if p[0] == "piece" and p[2] and _restore_inline(first[p[1]], p[2]) is None:
                        fallback += [f.strip() for f in _INLINE_CODE.split(p[3])[::2] if re.search(r"[^\W\d_]", f)]
            second = self._translate_pieces(fallback) if fallback else {}
            new: list[tuple[str, str]] = []
            for t, plan in plans.items():
                out = []
                for p in plan:
                    if p[0] == "code":
                        out.append(p[1])
                        continue
                    _, prot, codes, orig = p
                    restored = _restore_inline(first[prot], codes) if codes else first[prot]
                    if restored is None:
                        self.stats["inline_code_fallbacks"] += 1
                        restored = _rebuild_around_code(orig, second)
                    out.append(restored)
                tr = "".join(out)
                new.append((t, tr))
                done[t] = tr
            if self.cache is not None:
                self.cache.put_many(self.name, self.src, self.tgt, new)
            self.stats["translated"] += len(new)
        return [done[t] for t in texts]

    def translate_pairs(self, pairs: Sequence[Any], src: str, tgt: str) -> list[tuple[str, str]]:
        if (src, tgt) != (self.src, self.tgt):
            raise TranslationError(f"translator was set up for {self.src}->{self.tgt}, asked for {src}->{tgt}")
        texts = [p.instruction for p in pairs] + [p.response for p in pairs]
        out = self.translate(texts)
        n = len(pairs)
        return list(zip(out[:n], out[n:], strict=False))


def _rebuild_around_code(orig: str, table: dict[str, str]) -> str:
    """Join translations of the text between inline-code spans with the spans themselves."""
    out = []
    pos = 0
    for m in _INLINE_CODE.finditer(orig):
        out.append(_translate_fragment(orig[pos : m.start()], table))
        out.append(m.group(0))
        pos = m.end()
    out.append(_translate_fragment(orig[pos:], table))
    return "".join(out)


def _translate_fragment(frag: str, table: dict[str, str]) -> str:
    core = frag.strip()
    if not core or not re.search(r"[^\W\d_]", core):
        return frag
    lead = frag[: len(frag) - len(frag.lstrip())]
    trail = frag[len(frag.rstrip()) :]
    return lead + table.get(core, core) + trail


# --------------------------------------------------------------------------------------- factory
def make_translator(cfg: Any, *, progress: bool = True) -> Translator:
    """The translator a DataConfig asks for (`cfg.translator`: columns | hf)."""
    if cfg.translator == "columns":
        return ColumnsTranslator()
    if cfg.translator == "hf":
        cache = TranslationCache(Path(cfg.cache_dir).expanduser() / "translations.sqlite")
        return HFTranslator(
            cfg.translation_model,
            cfg.source_lang,
            cfg.target_lang,
            cache=cache,
            batch_size=cfg.translation_batch_size,
            max_length=cfg.translation_max_length,
            num_beams=cfg.translation_num_beams,
            device=cfg.translation_device,
            dtype=cfg.translation_dtype,
            progress=progress,
        )
    raise TranslationError(f"unknown translator {cfg.translator!r} (columns | hf)")
