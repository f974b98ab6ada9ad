"""Methods compared over seeds: per-seed values, mean and standard deviation of every evaluation metric, the
table (methods as columns), per-prompt scores, every method's difference from the reference method with a paired
bootstrap interval (clo_fast.evaluate.bootstrap), the claims' verdicts, and the plot. Used by `clo_fast.compare`.

A comparison is built from one `evaluate_models` report in which every trained model is a column labelled
`<method>/s<seed>`; the metrics are the report's per-language ones (fidelity, chrF, reference NLL/token) and, when
the prompts carry answers (the miniature world's test set), exact-match accuracy and "correct and in the prompt's
language" from the per-prompt scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from clo_fast.evaluate.bootstrap import paired_bootstrap, rule_text, verdict
from clo_fast.evaluate.report import fmt, new_figure

# (metric key, table name, better direction, digits): the report's metrics, then the per-prompt scores' means
METRICS = (
    ("fidelity", "fidelity", "↑", 3),
    ("accuracy", "exact-match accuracy", "↑", 3),
    ("correct_in_lang", "correct and in prompt language", "↑", 3),
    ("chrf", "chrF vs reference", "↑", 1),
    ("nll_per_token", "reference NLL/token", "↓", 3),
)
# per-prompt scores (1/0 per prompt): answered in the prompt's language; and, with answers, correct (the value
# named, in either language) and correct in the prompt's language. The claims are decided on the last one given.
PROMPT_SCORES = ("fidelity", "correct", "correct_in_lang")
SCORE_METRIC = {"correct": "accuracy"}  # per-prompt score → the table metric that is its mean


def summarize(values: Sequence[float | None]) -> dict:
    """{"values", "n", "mean", "std"}: the sample standard deviation (n − 1), None below two values; a None
    value (a metric a model could not get) makes mean and std None."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return {"values": vals, "n": len(vals), "mean": None, "std": None}
    mean = math.fsum(vals) / len(vals)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"values": vals, "n": len(vals), "mean": mean, "std": std}


def metric_names(langs: Sequence[str], keys: Sequence[str] | None = None) -> list[str]:
    """'fidelity/en', 'fidelity/sw', 'accuracy/en', ... in table order (only `keys`, when given)."""
    return [f"{key}/{lang}" for key, *_ in METRICS if keys is None or key in keys for lang in langs]


def prompt_scores(generations_path: str | Path, prompts: Sequence[dict] | None = None) -> dict:
    """Per-prompt scores from an evaluation's generations.jsonl: {"ids": {lang: [prompt id, ...]}, "scores":
    [PROMPT_SCORES present], "models": {label: {lang: {score: [1/0 per prompt, in the ids' order]}}}}.
    prompts: the evaluation items; those with "attribute" and "answer" (the world's) are scored for correctness."""
    from clo_fast.data.world import score_response

    answers = {(p["id"], p["lang"]): p for p in prompts or () if "answer" in p and "attribute" in p}
    rows = [json.loads(line) for line in Path(generations_path).read_text(encoding="utf-8").splitlines() if line]
    ids: dict[str, list] = {}
    models: dict[str, dict] = {}
    for r in rows:
        first = not models or r["model"] == next(iter(models))
        if first:
            ids.setdefault(r["lang"], []).append(r["id"])
        per_lang = models.setdefault(r["model"], {}).setdefault(r["lang"], {k: [] for k in PROMPT_SCORES})
        per_lang["fidelity"].append(int(r["faithful"]))  # in the language, and neither an echo nor a loop
        item = answers.get((r["id"], r["lang"]))
        if item is not None:
            s = score_response(r["response"], item["attribute"], item["answer"], r["lang"])
            per_lang["correct"].append(int(s["correct"]))
            per_lang["correct_in_lang"].append(int(s["correct_in_lang"]))
    present = [
        k for k in PROMPT_SCORES if all(len(v[k]) == len(ids[lang]) for m in models.values() for lang, v in m.items())
    ]
    for m in models.values():
        for lang, v in m.items():
            if len(v["fidelity"]) != len(ids[lang]):
                raise ValueError(f"{generations_path}: the models were not evaluated on the same {lang} prompts")
            for k in PROMPT_SCORES:
                if k not in present:
                    v.pop(k)
    return {"ids": ids, "scores": present, "models": models}


def aggregate(report: dict, groups: dict[str, list[str]], scores: dict | None = None) -> dict[str, dict[str, dict]]:
    """group name → metric name → summary over the group's model labels (one label per seed). With per-prompt
    `scores`, their means add the accuracy metrics."""
    langs = report["languages"]
    means = {}
    for label, per_lang in (scores or {}).get("models", {}).items():
        for lang, v in per_lang.items():
            for k, vals in v.items():
                if k != "fidelity":
                    means[(label, lang, SCORE_METRIC.get(k, k))] = math.fsum(vals) / len(vals) if vals else None
    out = {}
    for name, labels in groups.items():
        missing = [label for label in labels if label not in report["models"]]
        if missing:
            raise KeyError(f"comparison group {name!r}: models {missing} are not in the evaluation report")
        per_metric = {}
        for key, *_ in METRICS:
            for lang in langs:
                vals = [
                    means.get((label, lang, key), report["models"][label]["metrics"][lang].get(key)) for label in labels
                ]
                per_metric[f"{key}/{lang}"] = summarize(vals)
        out[name] = per_metric
    return out


def differences(scores: dict, groups: dict[str, list[str]], reference: str) -> dict[str, dict[str, dict]]:
    """method → "score/lang" → paired bootstrap of (method − reference) over prompts × seeds: seed i of the method
    is paired with seed i of the reference, prompt p with prompt p."""
    import numpy as np

    ref_labels = groups[reference]
    out = {}
    for name, labels in groups.items():
        if name == reference:
            continue
        if len(labels) != len(ref_labels):
            raise ValueError(f"method {name!r} has {len(labels)} seeds, {reference!r} {len(ref_labels)}: not paired")
        per = {}
        for lang in scores["ids"]:
            for k in scores["scores"]:
                a = np.array([scores["models"][label][lang][k] for label in labels], dtype=np.float64).T
                b = np.array([scores["models"][label][lang][k] for label in ref_labels], dtype=np.float64).T
                per[f"{k}/{lang}"] = paired_bootstrap(a - b)
        out[name] = per
    return out


def claim_verdicts(diffs: dict, claims: Sequence[tuple], target_lang: str) -> list[dict]:
    """Each claim (id, statement, method, language or "tgt", kind) decided by `bootstrap.verdict` on the
    difference from the reference in the strictest per-prompt score present ("correct_in_lang", else fidelity);
    "not run" when its method was not part of the comparison."""
    out = []
    for cid, statement, method, lang, kind in claims:
        lang = target_lang if lang == "tgt" else lang
        rec = {"id": cid, "claim": statement, "method": method, "lang": lang, "kind": kind}
        per = diffs.get(method)
        if per is None:
            out.append({**rec, "verdict": "not run"})
            continue
        score = next(k for k in reversed(PROMPT_SCORES) if f"{k}/{lang}" in per)
        d = per[f"{score}/{lang}"]
        out.append({**rec, "score": score, **d, "verdict": verdict(kind, d["lo"], d["hi"])})
    return out


def _label(metric: str) -> str:
    key, lang = metric.split("/")
    name, better, _ = next((n, b, d) for k, n, b, d in METRICS if k == key)
    return f"{name} {lang} ({better})"


def _digits(metric: str) -> int:
    return next(d for k, _, _, d in METRICS if k == metric.split("/")[0])


def present_metrics(comp: dict) -> list[str]:
    """The table's metric names that some model has a value for."""
    models = [comp["base"]] + [m["metrics"] for m in comp["methods"].values()]
    return [
        metric
        for metric in metric_names(comp["languages"])
        if any(m.get(metric, {}).get("mean") is not None for m in models)
    ]


def _interval(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def render_comparison_markdown(comp: dict) -> str:
    """The table (metrics as rows; base, then each method as mean ± std over seeds), every method's difference
    from the reference method with its interval, and the claims' verdicts under the rule that decides them."""
    methods = list(comp["methods"])
    langs = comp["languages"]
    seeds = ", ".join(str(s) for s in comp["seeds"])
    prompts = ", ".join(f"{lang}: {comp['n_prompts'][lang]}" for lang in langs)
    lines = [
        f"Held-out prompts: {prompts}; seeds {seeds} "
        f"(optim.seed: data order and every RNG); mean ± standard deviation over the seeds; "
        f"{comp['seconds'] / 60:.1f} min in all"
        + (f" ({comp['runs_reused']} runs reused from an earlier start)." if comp.get("runs_reused") else "."),
        "",
        "| metric | base | " + " | ".join(comp["methods"][m]["title"] for m in methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for metric in present_metrics(comp):
        d = _digits(metric)
        cells = [fmt(comp["base"][metric]["mean"], d)]
        for m in methods:
            s = comp["methods"][m]["metrics"][metric]
            cells.append(fmt(s["mean"], d) + ("" if s["std"] is None else f" ± {s['std']:.{d}f}"))
        lines.append(f"| {_label(metric)} | " + " | ".join(cells) + " |")
    from clo_fast.evaluate.comparison_extra import extra_rows  # benchmark and judge rows (imports this module)

    lines += extra_rows(comp, methods)
    diffs = comp.get("differences") or {}
    ref = comp.get("reference_method")
    if diffs and ref in comp["methods"]:
        others = [m for m in methods if m in diffs]
        lines += [
            "",
            f"Difference from {comp['methods'][ref]['title']} per prompt (method − {ref}, mean over prompts × seeds) "
            "with its 95% interval [paired bootstrap over prompts × seeds]:",
            "",
            "| per-prompt score | " + " | ".join(comp["methods"][m]["title"] for m in others) + " |",
            "|---|" + "---:|" * len(others),
        ]
        for key in diffs[others[0]]:
            score, lang = key.split("/")
            name = {
                "fidelity": "in prompt language",
                "correct": "correct",
                "correct_in_lang": "correct and in language",
            }
            lines.append(f"| {name[score]} {lang} | " + " | ".join(_interval(diffs[m][key]) for m in others) + " |")
    if comp.get("claims"):
        lines += ["", "The paper's claims, each decided on the per-prompt score named. " + rule_text(), ""]
        for c in comp["claims"]:
            if c["verdict"] == "not run":
                lines.append(f"- ({c['id']}) {c['claim']}: not run (no {c['method']} runs)")
                continue
            lines.append(
                f"- ({c['id']}) {c['claim']}: **{c['verdict']}** — {c['method']} − {ref}, {c['score']} on "
                f"{c['lang']} prompts: {_interval(c)}"
            )
    return "\n".join(lines) + "\n"


def plot_comparison(comp: dict, path: str | Path) -> bool:
    """PNG, one panel per metric and language: each method's mean with its standard deviation as an error bar,
    each seed as a dot, the base model as a dashed line. False if matplotlib is missing."""
    methods = list(comp["methods"])
    langs = comp["languages"]
    keys = [k for k, *_ in METRICS if any(m.startswith(k + "/") for m in present_metrics(comp))]
    rows = [spec for spec in METRICS if spec[0] in keys]
    fig = new_figure(max(7.0, 1.1 * len(methods) * len(langs) + 3), 3.0 * len(rows), 110)
    if fig is None:
        return False
    axes = fig.subplots(len(rows), len(langs), squeeze=False)
    for row, (key, name, better, _) in enumerate(rows):
        for col, lang in enumerate(langs):
            ax, metric = axes[row][col], f"{key}/{lang}"
            stats = [comp["methods"][m]["metrics"][metric] for m in methods]
            means = [float("nan") if s["mean"] is None else s["mean"] for s in stats]
            errs = [0.0 if s["std"] is None else s["std"] for s in stats]
            # markers, not bars: an NLL axis starting at 0 would hide every difference
            ax.errorbar(range(len(methods)), means, yerr=errs, fmt="s", color="#2a5a8a", capsize=4, label="mean ± std")
            for i, s in enumerate(stats):
                vals = [v for v in s["values"] if v is not None]
                seeds_label = "seeds" if i == 0 else None
                ax.plot([i + 0.12] * len(vals), vals, "o", color="#8fb3d9", markersize=3, label=seeds_label)
            base = comp["base"][metric]["mean"]
            if base is not None:
                ax.axhline(base, color="#b04a2f", linestyle="--", linewidth=1, label="base")
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([comp["methods"][m]["short"] for m in methods], fontsize=7)
            ax.set_title(f"{name}, {lang} prompts ({better})", fontsize=9)
            ax.set_xlim(-0.5, len(methods) - 0.5)
            if key in ("fidelity", "accuracy", "correct_in_lang"):
                ax.set_ylim(-0.05, 1.05)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(str(path))
    return True


def write_comparison(comp: dict, out_dir: str | Path) -> dict[str, str]:
    """compare.json, compare.md and compare.png under out_dir; returns their paths."""
    out = Path(out_dir)
    files = {"json": out / "compare.json", "markdown": out / "compare.md", "plot": out / "compare.png"}
    comp["files"] = {k: v.name for k, v in files.items()}  # relative: the folder can be moved or committed
    if not plot_comparison(comp, files["plot"]):
        comp["files"].pop("plot")
    files["markdown"].write_text(render_comparison_markdown(comp), encoding="utf-8")
    files["json"].write_text(json.dumps(comp, ensure_ascii=False, indent=1), encoding="utf-8")
    return comp["files"]
