"""The report: per-language metrics, the markdown table (models as columns), the plot and the files."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clo_fast.evaluate.answers import answer_flags
from clo_fast.logs import get_logger

# the report's 95% intervals: percentile bootstrap over the prompts (a model's answers are its units), seeded
CI_DRAWS = 1000
CI_SEED = 0
SHARES = {"fidelity": "faithful", "language_match": "in_language", "echo_rate": "echo", "loop_rate": "loop"}


def bootstrap_interval(stat, n: int, draws: int = CI_DRAWS, seed: int = CI_SEED) -> list[float] | None:
    """The 2.5 and 97.5 percentiles of `stat(indices)` over `draws` resamples of range(n) with replacement."""
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [float(stat(rng.integers(0, n, n))) for _ in range(draws)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def corpus_chrf(responses: Sequence[str], references: Sequence[str]) -> float:
    """chrF (character n-gram F-score, 0-100; sacrebleu's defaults: n ≤ 6, β = 2, no word n-grams) of the
    responses against one reference each, at corpus level (statistics summed over the pairs, then one F)."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(responses), [list(references)]).score)


def response_flags(items: Sequence[dict], gens: Sequence[dict], detected: Sequence[str | None]) -> list[dict]:
    """Per answer: echo, loop, in_language and faithful (`clo_fast.evaluate.answers`)."""
    if not (len(items) == len(gens) == len(detected)):
        raise ValueError("response_metrics: items, gens and detected must have the same length")
    return [
        answer_flags(it["prompt"], g["text"], it["lang"], d) for it, g, d in zip(items, gens, detected, strict=True)
    ]


def response_metrics(
    items: Sequence[dict], gens: Sequence[dict], detected: Sequence[str | None], flags: Sequence[dict] | None = None
) -> dict:
    """Per prompt language: n_prompts; fidelity (the share of answers in the prompt's language that are neither an
    echo of the prompt nor a loop) and its parts: language_match (in the language, whatever the answer), echo_rate,
    loop_rate; detected-language counts, mean response tokens, the share of responses that ended with EOS before
    the cap (finished_share), and chrF against the items' reference answers (None when no item of that language
    has one). `gens[i]` is {"text", "tokens", "finished"} for `items[i]`."""
    flags = response_flags(items, gens, detected) if flags is None else flags  # `flags`: already computed
    metrics = {}
    for lang in dict.fromkeys(it["lang"] for it in items):
        idx = [i for i, it in enumerate(items) if it["lang"] == lang]

        per_prompt = {name: np.array([flags[i][key] for i in idx], float) for name, key in SHARES.items()}
        per_prompt["finished_share"] = np.array([bool(gens[i]["finished"]) for i in idx], float)
        metrics[lang] = {
            "n_prompts": len(idx),
            **{name: float(v.mean()) for name, v in per_prompt.items()},
            "detected": dict(Counter(detected[i] or "none" for i in idx).most_common()),
            "mean_response_tokens": sum(gens[i]["tokens"] for i in idx) / len(idx),
        }
        ci = {name: bootstrap_interval(lambda i, v=v: v[i].mean(), len(v)) for name, v in per_prompt.items()}
        scored = [i for i in idx if items[i].get("reference") is not None]
        hyps, refs = [gens[i]["text"] for i in scored], [items[i]["reference"] for i in scored]
        metrics[lang]["chrf"] = corpus_chrf(hyps, refs) if scored else None
        metrics[lang]["chrf_prompts"] = len(scored)
        if scored:  # corpus chrF of resampled (answer, reference) pairs
            ci["chrf"] = bootstrap_interval(
                lambda i, h=hyps, r=refs: corpus_chrf([h[k] for k in i], [r[k] for k in i]), len(scored), draws=200
            )
        metrics[lang]["ci95"] = ci
    return metrics


def fmt(v, digits=3) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _targets(report: dict) -> str:
    several = report.get("target_langs") or [report["target_lang"]]
    return f"target language: {several[0]}" if len(several) == 1 else f"target languages: {', '.join(several)}"


def render_markdown(report: dict) -> str:
    """Metrics as rows, models as columns."""
    models = list(report["models"])
    langs = report["languages"]
    lines = [
        f"Evaluation on held-out prompts ({_targets(report)}; "
        + ", ".join(f"{lang}: {report['n_prompts'][lang]} prompts" for lang in langs)
        + "); [95% interval: bootstrap over prompts]. Fidelity: answers in the prompt's language that are neither "
        "an echo of the prompt nor a loop",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
    ]

    def row(name, key, lang, digits=3):
        cells = []
        for m in models:
            metrics = report["models"][m]["metrics"][lang]
            ci = metrics.get("ci95", {}).get(key)
            cells.append(
                fmt(metrics.get(key), digits) + (f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for lang in langs:
        row(f"fidelity {lang} (↑)", "fidelity", lang)
    for lang in langs:
        row(f"echo rate {lang} (↓)", "echo_rate", lang)
    for lang in langs:
        row(f"loop rate {lang} (↓)", "loop_rate", lang)
    for lang in langs:
        row(f"finished before the cap {lang} (↑)", "finished_share", lang)
    for lang in langs:
        row(f"chrF vs reference {lang} (↑)", "chrf", lang, 1)
    for lang in langs:
        row(f"reference NLL/token {lang} (↓)", "nll_per_token", lang)
    for lang in langs:
        row(f"mean response tokens {lang}", "mean_response_tokens", lang, 1)
    from clo_fast.evaluate.benchmarks import benchmark_markdown_rows

    lines += benchmark_markdown_rows(report)
    judge = report.get("judge", {})
    if judge.get("results"):
        lines += judge_markdown_rows(judge, models, langs)
    elif judge.get("skipped"):
        lines += ["", f"LLM judge: skipped ({judge['skipped']})."]
    if not report.get("nll_comparable", True):
        lines += ["", "Note: the models use different tokenizers, so NLL per token is not comparable across them."]
    return "\n".join(lines) + "\n"


def judge_markdown_rows(judge: dict, models: list[str], langs: list[str]) -> list[str]:
    """Per baseline and language: the win rate with its bootstrap interval, and the length-controlled one, in
    the candidate's column; then a line of counts (ties, off-format replies, failed requests) per pair."""
    lines, notes = [], []
    baselines = list(dict.fromkeys(base for _, base in judge["pairs"]))
    for base in baselines:
        for lang in langs:
            for key, name in (("win_rate", "judge win rate"), ("lc_win_rate", "length-controlled win rate")):
                cells = []
                for m in models:
                    r = judge["results"].get(m, {}).get(base, {}).get(lang)
                    ci = r and r.get(f"{key}_ci95")
                    cells.append("–" if not r else fmt(r[key]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
                lines.append(f"| {name} vs {base}, {lang} (↑) | " + " | ".join(cells) + " |")
    for cand, base in judge["pairs"]:
        for lang in langs:
            r = judge["results"][cand][base][lang]
            notes.append(
                f"- {cand} vs {base}, {lang}: {r['judged_prompts']}/{r['n_prompts']} prompts judged, "
                f"{r['wins']} wins / {r['ties']} ties / {r['losses']} losses over {r['judgments']} judgments "
                f"(both orders), {r['off_format']} off-format replies, {r['errors']} failed requests, "
                f"order agreement {fmt(r['order_agreement'])}"
                + (f"; first failure: {r['first_error']}" if r.get("first_error") else "")
            )
    judge_model = judge.get("judge_model") or "the endpoint's default model"
    head = f"LLM judge ({judge_model}): win rate [95% bootstrap interval over prompts]; ties count half."
    return lines + ["", head, *notes]


def new_figure(width: float, height: float, dpi: int):
    """A matplotlib Figure (no pyplot state), or None with a message when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        get_logger("evaluate").warning("plot skipped: matplotlib is not installed (pip install 'clo-fast[eval]')")
        return None
    return Figure(figsize=(width, height), dpi=dpi)


def plot_report(report: dict, path: str | Path) -> bool:
    """PNG with two panels: fidelity and reference NLL/token, one bar group per model; a third with benchmark
    accuracy ± stderr per task when the report has benchmarks. False if no matplotlib."""
    from clo_fast.evaluate.benchmarks import benchmark_tasks

    models = list(report["models"])
    langs = report["languages"]
    tasks = benchmark_tasks(report["models"])
    fig = new_figure(max(6.5, 1.4 * len(models) + 4) * (1.5 if tasks else 1.0), 4.0, 120)
    if fig is None:
        return False
    axes = fig.subplots(1, 3 if tasks else 2)
    if tasks:
        _plot_benchmarks(axes[2], report, models, tasks)
    width = min(0.35, 0.8 / max(1, len(langs)))
    for ax, key, title, fmt in (
        (axes[0], "fidelity", "language fidelity (↑)", "%.2f"),
        (axes[1], "nll_per_token", "reference NLL / token (↓)", "%.2f"),
    ):
        top = 0.0
        for j, lang in enumerate(langs):
            vals = [report["models"][m]["metrics"][lang].get(key) for m in models]
            xs = [i + (j - (len(langs) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, [float("nan") if v is None else v for v in vals], width, label=f"{lang} prompts")
            ax.bar_label(bars, fmt=fmt, fontsize=7)
            top = max([top] + [v for v in vals if v is not None])
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=15 if len(models) > 3 else 0)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.1 if key == "fidelity" else max(1e-3, top) * 1.15)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(langs), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(str(path))
    return True


def _plot_benchmarks(ax, report: dict, models: list[str], tasks: list[str]) -> None:
    """One bar group per task, one bar per model, the harness's stderr as the error bar."""
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        rows = [report["models"][m].get("benchmarks", {}).get(t, {}) for t in tasks]
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(tasks))]
        accs = [float("nan") if r.get("acc") is None else r["acc"] for r in rows]
        errs = [r.get("acc_stderr") or 0.0 for r in rows]
        ax.bar(xs, accs, width, yerr=errs, capsize=2, label=m)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("benchmark accuracy ± stderr (↑)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)


REDACTED = "<redacted>"
_SECRET_PATTERNS = (
    (re.compile(r"(https?://[^\s?#\"'<>]+)\?[^\s#\"'<>]*"), r"\1?" + REDACTED),  # URL query strings
    (re.compile(r"(https?://)[^/\s@\"'<>]+@"), r"\1" + REDACTED + "@"),  # user:password@host
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + REDACTED),
    (
        re.compile(r"(?i)((?:api[_-]?key|authorization|token|secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}&]+"),
        r"\1" + REDACTED,
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),  # OpenAI-style keys wherever they appear
)


def redact_secrets(obj, secrets: tuple[str, ...] = ()):
    """`obj` (str, or dicts/lists of them) with API keys, bearer tokens, credentials in URLs and URL query
    strings replaced by <redacted>; `secrets` are exact values (the judge's API key) removed too."""
    if isinstance(obj, dict):
        return {k: redact_secrets(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_secrets(v, secrets) for v in obj)
    if not isinstance(obj, str):
        return obj
    for secret in secrets:
        if secret:
            obj = obj.replace(secret, REDACTED)
    for pattern, replacement in _SECRET_PATTERNS:
        obj = pattern.sub(replacement, obj)
    return obj


def judge_secrets(report: dict) -> tuple[str, ...]:
    """The judge's API key, read from the environment variable the report's eval config names."""
    env = (report.get("eval_config") or {}).get("judge_api_key_env")
    return (os.environ.get(env, ""),) if env else ()


def write_report(report: dict, generations: list[dict], out_dir: str | Path) -> dict:
    """report.json, report.md, report.png, generations.jsonl under out_dir; returns their paths. Secrets
    (API keys, URL query strings, credentials echoed by an endpoint) never reach report.json or report.md."""
    report.update(redact_secrets(report, judge_secrets(report)))
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "plot": out / "report.png",
        "generations": out / "generations.jsonl",
    }
    report["files"] = {k: str(v) for k, v in files.items()}
    if not plot_report(report, files["plot"]):
        report["files"].pop("plot")
    files["markdown"].write_text(render_markdown(report), encoding="utf-8")
    with files["generations"].open("w", encoding="utf-8") as f:
        for g in generations:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
    files["json"].write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return report["files"]
