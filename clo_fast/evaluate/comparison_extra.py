"""The comparison's rows beyond the per-language metrics: benchmark accuracy (lm-evaluation-harness tasks,
`eval.benchmarks`) and the LLM judge's win rate against SFT (when `eval.judge_endpoint` is set), each as mean ±
standard deviation over the seeds, for `python -m clo_fast.compare`.

Within one seed, every method's model is judged against the SFT model of the same seed (`compare_judge_pairs`);
the win rate per method is then summarised over seeds like every other metric.
"""

from __future__ import annotations

from clo_fast.config import ConfigError, RunConfig
from clo_fast.evaluate.benchmarks import acc_cell, benchmark_tasks, check_benchmarks, task_language
from clo_fast.evaluate.bootstrap import summarize
from clo_fast.evaluate.report import fmt

JUDGE_KEYS = (("win_rate", "judge win rate"), ("lc_win_rate", "length-controlled win rate"))


def check_evaluation_extras(cfg: RunConfig) -> None:
    """compare trains for minutes before it evaluates: an unknown benchmark task or an unreachable judge fails
    first (a ConfigError naming the field), not after the training."""
    from clo_fast.evaluate.errors import EvalError
    from clo_fast.evaluate.judge import check_judge_reachable, make_send

    try:
        if cfg.eval.benchmarks:
            check_benchmarks(cfg, cfg.eval.benchmarks)
        if cfg.eval.judge_endpoint:
            check_judge_reachable(cfg, make_send(cfg))
    except EvalError as e:
        raise ConfigError(str(e)) from None


def compare_judge_pairs(methods: list[str], seeds: list[int], versus: str = "sft") -> list[tuple[str, str]] | None:
    """(method/s<seed>, versus/s<seed>) for every other method and seed; None when `versus` is not trained."""
    if versus not in methods:
        return None
    return [(f"{m}/s{s}", f"{versus}/s{s}") for m in methods if m != versus for s in seeds]


def aggregate_extra(report: dict, groups: dict[str, list[str]]) -> dict:
    """{"benchmarks": {task: {"lang", "groups": {group: summary of acc}}}, "judge": {"baseline", "rows":
    {"win_rate/<lang>": {group: summary}}}} over each group's model labels (one per seed)."""
    out: dict = {"benchmarks": {}}
    for task in benchmark_tasks(report["models"]):
        per_group = {
            name: summarize([_acc(report, label, task) for label in labels]) for name, labels in groups.items()
        }
        out["benchmarks"][task] = {"lang": task_language(task), "groups": per_group}
    judge = report.get("judge") or {}
    results = judge.get("results") or {}
    if results:
        baselines = sorted({base for _, base in judge["pairs"]})
        rows: dict = {}
        for lang in report["languages"]:
            for key, _ in JUDGE_KEYS:
                rows[f"{key}/{lang}"] = {
                    name: summarize([_only_baseline(results[label])[lang][key] for label in labels])
                    for name, labels in groups.items()
                    if all(label in results for label in labels)
                }
        out["judge"] = {"baselines": baselines, "rows": rows}
    return out


def _acc(report: dict, label: str, task: str) -> float | None:
    return report["models"][label].get("benchmarks", {}).get(task, {}).get("acc")


def _only_baseline(per_baseline: dict) -> dict:
    """compare judges each model against one baseline (the same seed's SFT model)."""
    (result,) = per_baseline.values()
    return result


def extra_rows(comp: dict, methods: list[str]) -> list[str]:
    """Markdown table rows (base column, then each method) for the comparison's benchmarks and judge."""
    extra = comp.get("extra") or {}
    lines = []
    for task, entry in extra.get("benchmarks", {}).items():
        lang = f" ({entry['lang']})" if entry["lang"] else ""
        cells = [_cell(entry["groups"].get(g)) for g in ["base", *methods]]
        lines.append(f"| {task}{lang} accuracy (↑) | " + " | ".join(cells) + " |")
    judge = extra.get("judge")
    if judge:
        versus = comp.get("judge_versus") or "/".join(judge["baselines"])
        for metric, groups in judge["rows"].items():
            key, lang = metric.split("/")
            name = dict(JUDGE_KEYS)[key]
            cells = [_cell(groups.get(g)) for g in ["base", *methods]]
            lines.append(f"| {name} vs {versus} {lang} (↑) | " + " | ".join(cells) + " |")
    return lines


def _cell(s: dict | None) -> str:
    if not s or s["mean"] is None:
        return "–"
    if s["n"] == 1:
        return fmt(s["mean"])
    return acc_cell(s["mean"], s["std"])
