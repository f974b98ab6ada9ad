"""Methods compared over seeds: per-seed values, mean and standard deviation of every evaluation metric, the
table (methods as columns), the differences larger than seed noise, and the plot. Used by `clo_fast.compare`.

A comparison is built from one `evaluate_models` report in which every trained model is a column labelled
`<method>/s<seed>`; the metrics are the report's per-language ones (fidelity, chrF, reference NLL/token).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from clo_fast.evaluate.report import fmt, new_figure

# (report key, table name, better direction, digits)
METRICS = (
    ("fidelity", "fidelity", "↑", 3),
    ("chrf", "chrF vs reference", "↑", 1),
    ("nll_per_token", "reference NLL/token", "↓", 3),
)
NOISE_SE = 2.0  # a difference counts as larger than seed noise beyond this many standard errors


def summarize(values: Sequence[float | None]) -> dict:
    """{"values", "n", "mean", "std"}: the sample standard deviation (n − 1), None below two values; a None
    value (a metric a model could not get) makes mean and std None."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return {"values": vals, "n": len(vals), "mean": None, "std": None}
    mean = math.fsum(vals) / len(vals)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"values": vals, "n": len(vals), "mean": mean, "std": std}


def metric_names(langs: Sequence[str]) -> list[str]:
    """'fidelity/en', 'fidelity/sw', 'chrf/en', ... in table order."""
    return [f"{key}/{lang}" for key, *_ in METRICS for lang in langs]


def aggregate(report: dict, groups: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """group name → metric name → summary over the group's model labels (one label per seed)."""
    langs = report["languages"]
    out = {}
    for name, labels in groups.items():
        missing = [label for label in labels if label not in report["models"]]
        if missing:
            raise KeyError(f"comparison group {name!r}: models {missing} are not in the evaluation report")
        per_metric = {}
        for key, *_ in METRICS:
            for lang in langs:
                per_metric[f"{key}/{lang}"] = summarize(
                    [report["models"][label]["metrics"][lang].get(key) for label in labels]
                )
        out[name] = per_metric
    return out


def noise_separated(a: dict, b: dict) -> bool | None:
    """Whether two summaries' means differ by more than NOISE_SE standard errors of the difference (Welch's
    form); None when either has fewer than two values. Equal constants (both stds 0) that differ count."""
    if a["std"] is None or b["std"] is None:
        return None
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    diff = abs(a["mean"] - b["mean"])
    return diff > NOISE_SE * se if se > 0 else diff > 0


def _label(metric: str) -> str:
    key, lang = metric.split("/")
    name, better, _ = next((n, b, d) for k, n, b, d in METRICS if k == key)
    return f"{name} {lang} ({better})"


def _digits(metric: str) -> int:
    return next(d for k, _, _, d in METRICS if k == metric.split("/")[0])


def render_comparison_markdown(comp: dict) -> str:
    """The table (metrics as rows; base, then each method as mean ± std over seeds), then the differences
    between CLO and every other method that exceed seed noise."""
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
    for metric in metric_names(langs):
        d = _digits(metric)
        cells = [fmt(comp["base"][metric]["mean"], d)]
        for m in methods:
            s = comp["methods"][m]["metrics"][metric]
            cells.append(fmt(s["mean"], d) + ("" if s["std"] is None else f" ± {s['std']:.{d}f}"))
        lines.append(f"| {_label(metric)} | " + " | ".join(cells) + " |")
    from clo_fast.evaluate.comparison_extra import extra_rows  # benchmark and judge rows (imports this module)

    lines += extra_rows(comp, methods)
    ref = comp.get("reference_method")
    if ref in comp["methods"] and len(methods) > 1:
        lines += [
            "",
            f"Differences from {comp['methods'][ref]['title']} larger than seed noise "
            f"(|Δ mean| > {NOISE_SE:g} standard errors):",
        ]
        for m in methods:
            if m == ref:
                continue
            a, b = comp["methods"][ref]["metrics"], comp["methods"][m]["metrics"]
            separated = {metric: noise_separated(a[metric], b[metric]) for metric in metric_names(langs)}
            found = [
                f"{_label(metric)} {a[metric]['mean'] - b[metric]['mean']:+.{_digits(metric)}f}"
                for metric, sep in separated.items()
                if sep
            ]
            if any(sep is None for sep in separated.values()):
                verdict = "not testable (fewer than two seeds)"
            else:
                verdict = "; ".join(found) if found else "none"
            lines.append(f"- vs {comp['methods'][m]['title']}: {verdict}")
    return "\n".join(lines) + "\n"


def plot_comparison(comp: dict, path: str | Path) -> bool:
    """PNG, one panel per metric and language: each method's mean with its standard deviation as an error bar,
    each seed as a dot, the base model as a dashed line. False if matplotlib is missing."""
    methods = list(comp["methods"])
    langs = comp["languages"]
    fig = new_figure(max(7.0, 1.1 * len(methods) * len(langs) + 3), 3.0 * len(METRICS), 110)
    if fig is None:
        return False
    axes = fig.subplots(len(METRICS), len(langs), squeeze=False)
    for row, (key, name, better, _) in enumerate(METRICS):
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
            if key == "fidelity":
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
