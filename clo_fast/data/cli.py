"""The data builder's command line (`python -m clo_fast.data`, console script `clo-fast-data`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clo_fast.atomic import OutputDirError, check_publishable
from clo_fast.config import ConfigError, add_override_argument, config_file, load_config, parse_args_with_overrides
from clo_fast.data.build import build_text_dataset, save_text_dataset, summary_json
from clo_fast.data.sources import DataError
from clo_fast.data.tokenize import tokenize_dataset
from clo_fast.data.trl_export import EXPORT_FORMATS, default_export_dir, export_trl
from clo_fast.logs import add_log_level_argument, get_logger, setup_logging
from clo_fast.paths import overlapping_outputs


def _summary_tokenizer(run: Any, explicit: str | None):
    """A tokenizer for the token-length summary and the tokenization cache: --tokenizer, else the run's
    model (`demo` resolves to the built demo model)."""
    from clo_fast.paths import looks_local
    from clo_fast.pretrained import load_tokenizer

    where = f"--tokenizer {explicit}" if explicit else f"model.name_or_path {run.model.name_or_path}"
    if explicit and looks_local(explicit) and not Path(explicit).expanduser().is_dir():
        raise ConfigError(f"{where}: local tokenizer folder not found")
    try:
        return load_tokenizer(explicit) if explicit else load_tokenizer(run.model, run.data.cache_dir)
    except (OSError, ValueError) as e:  # not a tokenizer folder, or a hub name that cannot be fetched
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"{where}: no tokenizer could be loaded ({first[:300]})") from None


def _print_summary(summary: dict, tok_stats: dict | None, out: Path) -> None:
    p = print
    p(
        f"\nclo-fast data: {summary['source']} ({summary['source_format']}) -> {summary['target_lang']} "
        f"via {summary['translator']}  [{summary['seconds']} s]"
    )
    p(
        f"  records read {summary['records_read']}, valid pairs {summary['valid_pairs']}, "
        f"selected {summary['selected']}, kept {summary['kept']} (train {summary['train']}, eval {summary['eval']})"
    )
    if len(summary.get("mix", [])) > 1:
        p("  mix (selected / kept pairs, share of the kept):")
        for m in summary["mix"]:
            how = f"weight {m['weight']}" if m["weight"] is not None else f"max_examples {m['max_examples']}"
            p(
                f"    {m['source']} ({m['source_format']}, {m['translator']}, {how}): read {m['records_read']}, "
                f"valid {m['valid_pairs']}, selected {m['selected']}, kept {m['kept']} ({m['share']:.1%})"
            )
    if summary["skipped_bad_records"]:
        p(f"  skipped bad records: {summary['skipped_bad_records']}")
        for e in summary["skipped_examples"][:5]:
            p(f"    e.g. {e}")
    if summary["filtered"]:
        p(f"  filtered (oasst): {summary['filtered']}")
    q = summary.get("quality") or {}
    if q.get("enabled"):
        rejected = q["rejected"]
        why = ", ".join(f"{k} {v}" for k, v in rejected.items()) or "none"
        p(f"  translation quality gate: {q['checked']} pairs checked, dropped {sum(rejected.values())} ({why})")
        if rejected:
            p(f"    the dropped pairs, with the reason: {out / q['rejects_file']}")
    tr = summary.get("translation") or {}
    if "backend" not in tr:  # a mix: one translator per kind
        tr = tr.get("hf", {})
    if tr.get("backend") == "hf":
        p(
            f"  translation: {tr['texts']} texts, cache hits {tr['cache_hits']}, newly translated {tr['translated']} "
            f"({tr['pieces_translated']} pieces in {tr['model_calls']} model calls, "
            f"piece cache hits {tr['piece_cache_hits']})"
        )
    if tok_stats:
        for split, st in tok_stats.items():
            p(
                f"  tokenized {split}: kept {st['kept']}/{st['examples']}, dropped {st['dropped']}, "
                f"truncated {st['truncated']} (max_length {st['max_length']}, cache hit {st['cache_hit']})"
            )
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
    """`python -m clo_fast.data --config configs/<run>.yaml [--tokenizer NAME] [--set data.key=value ...]`."""
    from clo_fast.data.translate import TranslationError

    ap = argparse.ArgumentParser(prog="clo-fast-data", description="Build a cross-lingual CLO dataset.")
    ap.add_argument(
        "--config", type=config_file, help="run config YAML or shipped name (its `data:` section); defaults if omitted"
    )
    add_override_argument(ap)
    ap.add_argument(
        "--tokenizer",
        help="tokenizer (path or hub name) for the tokenization cache and token-length "
        "stats (default: the config's model; 'demo' = the built demo model)",
    )
    ap.add_argument("--no-tokenize", action="store_true", help="build the text dataset only")
    ap.add_argument(
        "--export-format",
        choices=EXPORT_FORMATS,
        help="also write the pairs in this format: trl = TRL's preference (prompt/chosen/rejected, both directions) "
        "and SFT (prompt/completion) datasets, for datasets.load_from_disk (clo_fast/data/trl_export.py)",
    )
    ap.add_argument("--export-dir", help="where the export goes (default: <data.output_dir>_trl)")
    ap.add_argument("--no-progress", action="store_true")
    add_log_level_argument(ap)
    args = parse_args_with_overrides(ap, argv, reads=("model", "data"))
    setup_logging(args.log_level)
    try:
        run = load_config(args.config, args.set)
        cfg = run.data
        # refused before the (possibly long) build: a folder the user made, or another kind of output
        check_publishable(cfg.output_dir, "data.output_dir", "data")
        tok = None if args.no_tokenize else _summary_tokenizer(run, args.tokenizer)  # a bad one: refused first
        export_dir = args.export_dir or default_export_dir(cfg)
        if args.export_format:
            clash = overlapping_outputs({"data.output_dir": cfg.output_dir, "--export-dir": export_dir})
            if clash:
                raise ConfigError(f"--export-dir: {clash}")
            check_publishable(export_dir, "--export-dir", "trl_export")
        elif args.export_dir:
            raise ConfigError("--export-dir: applies with --export-format only")
        dsd, summary = build_text_dataset(cfg, progress=not args.no_progress)
        out = save_text_dataset(dsd, summary, cfg.output_dir)
        tok_stats = None
        if tok is not None:
            tok_stats = {}
            for split in ("train", "eval"):
                st: dict = {}
                tokenize_dataset(dsd[split], tok, cfg, stats=st)
                tok_stats[split] = st
            summary["tokenized"] = tok_stats
            (out / "summary.json").write_text(summary_json(summary))
        if args.export_format:  # TRL formats: the prompt rendered as training renders it (chat: by TRL itself)
            chat_tok = (tok or _summary_tokenizer(run, args.tokenizer)) if cfg.template == "chat" else None
            exported = export_trl(dsd, chat_tok, cfg, export_dir)
    except (DataError, ConfigError, OutputDirError, TranslationError) as e:
        get_logger().error(f"error: {e}")
        return 2
    _print_summary(summary, tok_stats, out)
    if args.export_format:
        print(f"  {args.export_format} export (datasets.load_from_disk): {exported}/preference, {exported}/sft")
    return 0
