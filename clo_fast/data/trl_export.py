"""The cross-lingual pairs as TRL's datasets (`clo-fast data --export-format trl`), for TRL's DPOTrainer /
SFTTrainer or any tool that reads TRL's formats (axolotl's, for one).

    <export_dir>/preference   DatasetDict (train, eval): prompt, chosen, rejected; both directions of every example
                              (English prompt: chosen y_en, rejected y_tgt; target prompt: chosen y_tgt, rejected
                              y_en), plus id, target_lang, direction (the prompt's language)
    <export_dir>/sft          DatasetDict (train, eval): prompt, completion; the English and the target pair of every
                              example (id, target_lang, lang): CLO's NLL covers `clo.sft_sequences` (default: lang
                              == target_lang only)

template: plain gives TRL's standard format, the prompt already in data.prompt_template (and the system text), so
TRL tokenizes exactly the prompt clo-fast trains on. template: chat gives TRL's conversational format (lists of
{role, content}: the system turn, earlier turns and the user turn), which TRL renders with the tokenizer's chat
template itself. Read back with `datasets.load_from_disk(<export_dir>/preference)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clo_fast.atomic import atomic_directory
from clo_fast.config import DataConfig
from clo_fast.data.tokenize import format_prompt, prompt_messages

EXPORT_FORMATS = ("trl",)


def default_export_dir(cfg: DataConfig) -> str:
    """Beside the text dataset: `<data.output_dir>_trl`."""
    return str(Path(cfg.output_dir).expanduser()).rstrip(os.sep) + "_trl"


def trl_records(ds, tokenizer: Any, cfg: DataConfig) -> tuple[dict[str, list], dict[str, list]]:
    """(preference columns, sft columns) of one split of the text dataset (docs/INTERFACES.md)."""
    chat = cfg.template == "chat"

    def prompt(instruction: str, lang: str, context: list[dict]):
        if chat:
            return prompt_messages(instruction, tokenizer, cfg, lang, context)
        return format_prompt(instruction, tokenizer, cfg, lang, context)

    def reply(text: str):
        return [{"role": "assistant", "content": text}] if chat else text

    pref: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", "id", "target_lang", "direction")}
    sft: dict[str, list] = {k: [] for k in ("prompt", "completion", "id", "target_lang", "lang")}
    for row in ds:
        tgt, src = row["target_lang"], cfg.source_lang
        x_en, y_en, x_tgt, y_tgt = row["prompt_en"], row["response_en"], row["prompt_tgt"], row["response_tgt"]
        c_en, c_tgt = (json.loads(row.get(k) or "[]") for k in ("context_en", "context_tgt"))
        for lang, x, c, good, bad in ((src, x_en, c_en, y_en, y_tgt), (tgt, x_tgt, c_tgt, y_tgt, y_en)):
            p = prompt(x, lang, c)
            for k, v in (("prompt", p), ("chosen", reply(good)), ("rejected", reply(bad))):
                pref[k].append(v)
            pref["id"].append(row["id"])
            pref["target_lang"].append(tgt)
            pref["direction"].append(lang)
            for k, v in (("prompt", p), ("completion", reply(good)), ("id", row["id"]), ("target_lang", tgt)):
                sft[k].append(v)
            sft["lang"].append(lang)
    return pref, sft


def export_trl(dsd, tokenizer: Any, cfg: DataConfig, export_dir: str | os.PathLike) -> Path:
    """Write `preference/` and `sft/` (module docstring) into `export_dir`, published whole (a folder the user made
    is refused). Empty splits are left out: `datasets.load_from_disk` cannot read one back."""
    import datasets

    splits = {name: trl_records(dsd[name], tokenizer, cfg) for name in dsd if len(dsd[name])}
    out = Path(export_dir).expanduser()
    with atomic_directory(out, "trl_export") as tmp:
        for i, kind in enumerate(("preference", "sft")):
            d = datasets.DatasetDict({name: datasets.Dataset.from_dict(cols[i]) for name, cols in splits.items()})
            d.save_to_disk(str(tmp / kind))
    return out
