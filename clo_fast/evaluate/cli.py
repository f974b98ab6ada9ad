"""`python -m clo_fast.evaluate --config <run>.yaml --model base=<path> --model clo=<path>` (clo-fast-eval).

... --model clo=<path> --versus sft=<path> --set eval.judge_endpoint=http://localhost:8000/v1   # win rate
... --model base=<path> --model clo=<path> --benchmarks mmlu mmmlu_sw_ke                        # lm-eval
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from clo_fast.atomic import OutputDirError
from clo_fast.config import (
    ConfigError,
    add_override_argument,
    config_file,
    load_config,
    parse_args_with_overrides,
    validate_output_locations,
)
from clo_fast.evaluate.errors import EvalError
from clo_fast.evaluate.prompts import read_prompts_file
from clo_fast.evaluate.report import render_markdown
from clo_fast.evaluate.run import evaluate_models, parse_model_specs
from clo_fast.language_id import UnknownLanguageError
from clo_fast.logs import add_log_level_argument, get_logger, setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clo_fast.evaluate", description="Evaluate models side by side.")
    ap.add_argument(
        "--config",
        required=True,
        type=config_file,
        help="run config YAML or a shipped config's name (data.* gives prompts/template, eval.* the rest)",
    )
    ap.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[LABEL=]PATH",
        help="model directory or hub name; repeat for a side-by-side table (e.g. base=... clo=...)",
    )
    ap.add_argument(
        "--versus",
        metavar="LABEL=PATH",
        help="the baseline every --model is judged against (e.g. sft=PATH): both answer every prompt, the LLM "
        "judge at eval.judge_endpoint compares them in both orders; same as adding --model LABEL=PATH with "
        "--set eval.judge_baseline=LABEL",
    )
    ap.add_argument(
        "--benchmarks",
        nargs="+",
        metavar="TASK",
        help="lm-evaluation-harness tasks run on every model (e.g. mmlu mmmlu_sw_ke); "
        "same as --set eval.benchmarks=[...]",
    )
    ap.add_argument("--prompts", help="JSON/JSONL prompt records instead of the dataset's eval split")
    ap.add_argument("--out-dir", help="output folder (default eval.output_dir)")
    add_override_argument(ap)
    # shorthands kept from before --set existed: --max-prompts N is --set eval.max_prompts=N
    for flag in ("max_prompts", "max_new_tokens", "batch_size"):
        ap.add_argument("--" + flag.replace("_", "-"), type=int, help=f"same as --set eval.{flag}=N")
    add_log_level_argument(ap)
    args = parse_args_with_overrides(ap, argv, reads=("model", "data", "eval"))
    setup_logging(args.log_level)
    shorthands = [
        f"eval.{k}={getattr(args, k)}"
        for k in ("max_prompts", "max_new_tokens", "batch_size")
        if getattr(args, k) is not None
    ]
    models = list(args.model)
    if args.benchmarks:
        shorthands.append("eval.benchmarks=" + json.dumps(args.benchmarks))
    try:
        if args.versus:
            label = parse_model_specs([args.versus])[0][0]
            models.append(args.versus)
            shorthands.append(f"eval.judge_baseline={json.dumps(label)}")
        cfg = load_config(args.config, args.set + shorthands)
        if args.versus and not cfg.eval.judge_endpoint:
            raise EvalError("--versus needs an LLM judge: set eval.judge_endpoint (e.g. --set eval.judge_endpoint=URL)")
        if args.out_dir:  # the report folder never collides with, or nests in, another output
            replaced = {"eval.output_dir": None, "--out-dir": args.out_dir}
            validate_output_locations(cfg, lambda _name: args.config, replaced)
        prompts = read_prompts_file(args.prompts) if args.prompts else None
        report = evaluate_models(cfg, models, prompts=prompts, out_dir=args.out_dir)
    except (EvalError, ConfigError, OutputDirError, UnknownLanguageError) as e:
        get_logger().error(f"error: {e}")
        return 2
    print()
    print(render_markdown(report))
    print("files: " + ", ".join(report["files"].values()))
    failed = unjudged(report)
    if failed:  # the report is written (its notes say why), but a win rate with no judgment is no success
        get_logger().error(f"error: the LLM judge gave no judgment for {'; '.join(failed)}")
        return 1
    return 0


def unjudged(report: dict) -> list[str]:
    """'cand vs base, lang: 0/N prompts judged (first failure: ...)' for every pair and language that had prompts
    and got no judgment (the judge passed its start-up probe, then failed every request)."""
    judge = report.get("judge") or {}
    out = []
    for cand, base in judge.get("pairs", []):
        for lang, r in judge["results"][cand][base].items():
            if r["n_prompts"] and not r["judged_prompts"]:
                why = f" (first failure: {r['first_error']})" if r.get("first_error") else ""
                out.append(f"{cand} vs {base}, {lang}: 0/{r['n_prompts']} prompts judged{why}")
    return out
