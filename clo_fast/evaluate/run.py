"""The driver: every model on the same prompts, side by side; `evaluate_models` is the Python API."""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clo_fast.atomic import claim_output_dir
from clo_fast.config import RunConfig, target_languages, validate_eval
from clo_fast.constants import TOKENIZER_FILES
from clo_fast.data.tokenize import tokenizer_fingerprint
from clo_fast.evaluate.benchmarks import check_benchmarks, run_benchmarks
from clo_fast.evaluate.errors import EvalError
from clo_fast.evaluate.generation import generate_responses, reference_examples, reference_nll_per_sequence
from clo_fast.evaluate.judge import check_judge_reachable, judge_cache_path, judge_pairs, make_send, run_judge
from clo_fast.evaluate.models import load_model
from clo_fast.evaluate.prompts import encode_item, load_eval_prompts, normalize_prompts
from clo_fast.evaluate.report import bootstrap_interval, fmt, response_flags, response_metrics, write_report
from clo_fast.language_id import get_identifier, normalize_lang
from clo_fast.logs import get_logger
from clo_fast.paths import looks_local
from clo_fast.pretrained import ensure_pad_token

log = get_logger("evaluate")


def parse_model_specs(model_paths) -> list[tuple[str, Any]]:
    """[(label, path-or-(model, tokenizer))] from 'path', 'label=path', (label, x) or {label: x}."""
    if isinstance(model_paths, (str, os.PathLike)):
        model_paths = [model_paths]
    if isinstance(model_paths, dict):
        model_paths = list(model_paths.items())
    specs = []
    for m in model_paths:
        if isinstance(m, tuple):
            label, src = m
        else:
            m = os.fspath(m)
            head, sep, tail = m.partition("=")
            if sep and head and re.fullmatch(r"[\w.\-]+", head) and tail:
                label, src = head, tail
            else:
                label, src = (Path(m.rstrip("/")).name or m), m
        specs.append((str(label), src))
    if not specs:
        raise EvalError("no models to evaluate: pass at least one --model")
    labels = [s[0] for s in specs]
    dup = [label for label, c in Counter(labels).items() if c > 1]
    if dup:
        raise EvalError(f"model label {dup[0]!r} is used twice: name them, e.g. --model base=PATH --model clo=PATH")
    return specs


def evaluate_models(
    cfg: RunConfig,
    model_paths,
    prompts: Sequence[dict] | None = None,
    out_dir: str | Path | None = None,
    *,
    judge_send: Callable[[dict], str] | None = None,
    pairs_to_judge: Sequence[tuple[str, str]] | None = None,
) -> dict:
    """Evaluate models side by side and write the report files. Returns the report dict.

    model_paths: list of 'path', 'label=path' or (label, path) / (label, (model, tokenizer)) — an
      already-loaded pair is used as is (and not freed). Labels default to the path's last component.
    prompts: records as in `normalize_prompts`; default: the "eval" split of the text-level dataset.
    out_dir: default `cfg.eval.output_dir`.
    judge_send: replaces the HTTP call of the LLM judge (tests); the judge runs only when
      `cfg.eval.judge_endpoint` is set or judge_send is given.
    pairs_to_judge: (candidate, baseline) labels to judge (default: every model against eval.judge_baseline).
    `cfg.eval.benchmarks` (lm-evaluation-harness tasks) run on every model, after its generations.
    Bad input (unknown task, no lm-eval, unreachable judge, a model folder without a tokenizer) fails before
    any model is loaded.
    """
    ev = cfg.eval
    validate_eval(cfg, lambda _name: "<config>")  # configs built in code skip load_config
    targets = [normalize_lang(c) for c in target_languages(cfg.data)]
    target = targets[0]
    specs = parse_model_specs(model_paths)
    what = "--out-dir" if out_dir is not None else "eval.output_dir"
    out_dir = out_dir if out_dir is not None else ev.output_dir
    judging = bool(ev.judge_endpoint or judge_send)
    pairs = list(pairs_to_judge) if pairs_to_judge is not None else None
    _check_before_generating(specs, cfg, judging=judging, pairs=pairs)
    manager = check_benchmarks(cfg, ev.benchmarks) if ev.benchmarks else None
    if judging and len(specs) >= 2 and judge_send is None:  # a judge function passed in code is not probed
        judge_send = make_send(cfg)
        check_judge_reachable(cfg, judge_send)
    # the report folder: new, empty or an earlier evaluation's, never a folder the user or another output owns
    out_dir = claim_output_dir(out_dir, what, "evaluation")
    records = load_eval_prompts(cfg) if prompts is None else list(prompts)
    if not records:
        raise EvalError("no evaluation prompts: the prompt list is empty")
    items = normalize_prompts(records, targets, ev.max_prompts)
    order = ["en", *targets]
    langs = sorted({it["lang"] for it in items}, key=lambda c: (order.index(c) if c in order else len(order), c))
    lid = get_identifier(langs, ev.detector_languages)
    t0 = time.time()

    report: dict = {
        "target_lang": target,
        "target_langs": targets,
        "languages": langs,
        "n_prompts": {lang: sum(it["lang"] == lang for it in items) for lang in langs},
        "eval_config": dataclasses.asdict(ev),
        "template": cfg.data.template,
        "detector_languages": list(lid.languages),
        "models": {},
    }
    generations: list[dict] = []
    responses: dict[str, list[str]] = {}
    for label, src in specs:
        report["models"][label], responses[label], records = _evaluate_spec(label, src, items, langs, lid, cfg, manager)
        generations += records

    fingerprints = {m["tokenizer"] for m in report["models"].values()}
    report["nll_comparable"] = len(fingerprints) == 1
    if not report["nll_comparable"]:
        log.warning("warning: the models use different tokenizers: NLL per token is not comparable across them")
    report["judge"] = run_judge(
        cfg, items, responses, langs, send=judge_send, pairs=pairs, cache_path=judge_cache_path(cfg, out_dir)
    )
    report["seconds"] = round(time.time() - t0, 2)
    write_report(report, generations, out_dir)
    return report


def _evaluate_spec(label: str, src, items: list[dict], langs: list[str], lid, cfg: RunConfig, manager):
    """One model of the comparison, loaded from its path (and freed after) or as passed in (left as it was):
    (its report entry, its responses, its generations.jsonl records)."""
    t1 = time.time()
    owned = not isinstance(src, tuple)
    if owned:
        model, tokenizer = load_model(str(src), cfg)
    else:
        model, tokenizer = src
        ensure_pad_token(tokenizer)
        was_training = model.training
        model.eval()
    gens, detected, flags, metrics = _evaluate_model(model, tokenizer, items, langs, lid, cfg)
    entry = {
        "path": str(src) if owned else "<in-memory model>",
        "metrics": metrics,
        "tokenizer": tokenizer_fingerprint(tokenizer)[:12],
    }
    if manager is not None:
        entry["benchmarks"] = run_benchmarks(model, tokenizer, cfg, manager)
    entry["seconds"] = round(time.time() - t1, 2)
    responses = [g["text"] for g in gens]
    records = _generation_records(label, items, gens, detected, flags)
    summary = "; ".join(
        f"{lang}: fidelity {metrics[lang]['fidelity']:.3f}, NLL/tok {fmt(metrics[lang]['nll_per_token'])}"
        for lang in langs
    )
    log.info(f"{label}: {summary} ({time.time() - t1:.1f}s)")
    if owned:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        model.train(was_training)
    return entry, responses, records


def _evaluate_model(model, tokenizer, items: list[dict], langs: list[str], lid, cfg: RunConfig):
    """One model on every item: greedy responses, their detected languages, and the metrics per language
    (fidelity, lengths, reference NLL per token)."""
    ev = cfg.eval
    prompt_ids = [encode_item(tokenizer, it, cfg.data) for it in items]
    gens = generate_responses(model, tokenizer, prompt_ids, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
    detected = lid.detect_batch([g["text"] for g in gens])
    refs = reference_examples(tokenizer, items, cfg.data)
    flags = response_flags(items, gens, detected)
    metrics = response_metrics(items, gens, detected, flags)
    for lang in langs:
        ex = [refs[i] for i, it in enumerate(items) if it["lang"] == lang and refs[i] is not None]
        sums, toks = reference_nll_per_sequence(model, tokenizer, ex, batch_size=ev.batch_size) if ex else ([], [])
        nll_sum, nll_tok = sum(sums), sum(toks)
        metrics[lang].update(
            nll_per_token=nll_sum / nll_tok if nll_tok else None, nll_tokens=nll_tok, nll_sequences=len(ex)
        )
        if nll_tok:  # a ratio of sums: resample whole sequences
            s, t = np.asarray(sums), np.asarray(toks)
            metrics[lang]["ci95"]["nll_per_token"] = bootstrap_interval(
                lambda i, s=s, t=t: s[i].sum() / t[i].sum(), len(s)
            )
    return gens, detected, flags, metrics


def _check_before_generating(
    specs: list[tuple[str, Any]], cfg: RunConfig, *, judging: bool, pairs: list[tuple[str, str]] | None
) -> None:
    """Fail before any generation when a local model path is plainly wrong (missing, no tokenizer) or the
    judge's labels are unknown."""
    for label, src in specs:
        if isinstance(src, tuple):
            continue
        path = os.path.expanduser(str(src))
        if looks_local(str(src)) and not os.path.exists(path):
            raise EvalError(f"model path {str(src)!r} does not exist")
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise EvalError(
                f"model {label!r} ({str(src)!r}, --model/--versus): the folder has no tokenizer "
                f"({' / '.join(TOKENIZER_FILES)}); save the tokenizer beside the weights"
            )
    labels = [label for label, _ in specs]
    if judging and len(labels) >= 2:
        for cand, base in pairs if pairs is not None else judge_pairs(cfg, labels):
            for name in (cand, base):
                if name not in labels:
                    raise EvalError(f"judge pair ({cand!r}, {base!r}): {name!r} is not a model label ({labels})")


def _generation_records(
    label: str, items: list[dict], gens: list[dict], detected: list, flags: list[dict]
) -> list[dict]:
    """One generations.jsonl line per prompt: what the model answered, which language it was detected as, and
    whether it is an echo, a loop, faithful (`clo_fast.evaluate.answers`)."""
    return [
        {
            "model": label,
            "id": it["id"],
            "lang": it["lang"],
            "prompt": it["prompt"],
            "response": g["text"],
            "response_tokens": g["tokens"],
            "finished": g["finished"],
            "detected": d,
            **{k: f[k] for k in ("echo", "loop", "faithful")},
        }
        for it, g, d, f in zip(items, gens, detected, flags, strict=True)
    ]
