"""Benchmark accuracy through lm-evaluation-harness (the `lm-eval` package, its Python API).

`eval.benchmarks: [task, ...]` names harness tasks or groups; every evaluated model (base and trained) runs them
through `lm_eval.simple_evaluate` on an `HFLM` wrapping the model already loaded for generation, with the
tokenizer's chat template when `eval.benchmark_chat_template` says so. The report gets, per model and task,
accuracy ± the harness's standard error (`acc` / `acc_stderr`; `acc_norm` too where the task has it) and the
task's language.

The paper's MMMLU (OpenAI's human-translated MMLU) for its six target languages, as the harness names it
(`lm_eval/tasks/openai-mmmlu`, lm-eval 0.4.13), with English MMLU beside it and two alternatives:

| language | MMMLU (the paper's) | Global-MMLU | Belebele (reading) |
|---|---|---|---|
| en | `mmlu` | `global_mmlu_en` | `belebele_eng_Latn` |
| zh | `mmmlu_zh_cn` | `global_mmlu_zh` | `belebele_zho_Hans` |
| de | `mmmlu_de_de` | `global_mmlu_de` | `belebele_deu_Latn` |
| ko | `mmmlu_ko_kr` | `global_mmlu_ko` | `belebele_kor_Hang` |
| id | `mmmlu_id_id` | `global_mmlu_id` | `belebele_ind_Latn` |
| sw | `mmmlu_sw_ke` | `global_mmlu_sw` | `belebele_swh_Latn` |
| yo | `mmmlu_yo_ng` | `global_mmlu_yo` | `belebele_yor_Latn` |

All six exist in the harness (none is missing). The shipped local tasks `demo_mc_en` / `demo_mc_sw`
(`clo_fast/benchmark_tasks/demo_mc`: the harness's YAML task format over a JSONL file) are for tests and the demo.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from pathlib import Path

from clo_fast.config import RunConfig
from clo_fast.evaluate.errors import EvalError

SHIPPED_TASKS_DIR = Path(__file__).resolve().parent.parent / "benchmark_tasks"
METRIC_KEYS = ("acc", "acc_norm")  # reported when the task has them; acc is the headline
_ISO3 = {"eng": "en", "zho": "zh", "deu": "de", "kor": "ko", "ind": "id", "swh": "sw", "yor": "yo"}
_LANG_PATTERNS = (  # task name → language code, for the per-language rows
    (re.compile(r"^mmlu(_|$)"), lambda m: "en"),
    (re.compile(r"^mmmlu_([a-z]{2})_[a-z]{2}(_|$)"), lambda m: m.group(1)),
    (re.compile(r"^global_mmlu(?:_full)?_([a-z]{2,3})(_|$)"), lambda m: m.group(1)),
    (re.compile(r"^belebele_([a-z]{3})_"), lambda m: _ISO3.get(m.group(1), m.group(1))),
    (re.compile(r"_([a-z]{2})$"), lambda m: m.group(1)),  # demo_mc_sw, arc_ko ...: a trailing language code
)


def task_language(task: str) -> str | None:
    """The language a harness task tests, from its name (mmlu → en, mmmlu_sw_ke → sw, ...); None if unknown."""
    for pattern, lang in _LANG_PATTERNS:
        m = pattern.search(task)
        if m:
            return lang(m)
    return None


def require_lm_eval(field: str = "eval.benchmarks") -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError(f"{field} needs the lm-eval package (lm-evaluation-harness): pip install 'clo-fast[eval]'")


def task_manager(cfg: RunConfig, *, include_defaults: bool = True):
    """The harness's TaskManager over its own tasks, the shipped demo tasks and eval.benchmark_tasks_dir."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(SHIPPED_TASKS_DIR)]
    if cfg.eval.benchmark_tasks_dir:
        extra = Path(cfg.eval.benchmark_tasks_dir).expanduser()
        if not extra.is_dir():
            raise EvalError(f"eval.benchmark_tasks_dir {cfg.eval.benchmark_tasks_dir!r} is not a folder")
        paths.append(str(extra))
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def check_benchmarks(cfg: RunConfig, tasks: Sequence[str], manager=None):
    """Every task name known to the harness (or the shipped/extra folders), else an EvalError naming the
    unknown ones and the field. Returns the TaskManager (building it reads every task YAML: ~10-30 s)."""
    require_lm_eval()
    manager = manager or task_manager(cfg, include_defaults=not all(_shipped(t) for t in tasks))
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise EvalError(
            f"eval.benchmarks / --benchmarks: unknown lm-evaluation-harness task(s) {unknown}; list the names "
            "with `lm-eval ls tasks` (the paper's MMMLU: mmmlu_<lang>_<region>, e.g. mmmlu_sw_ke)"
        )
    return manager


def _shipped(task: str) -> bool:
    return any(p.stem == task for p in SHIPPED_TASKS_DIR.rglob("*.yaml"))


def use_chat_template(cfg: RunConfig, tokenizer) -> bool:
    mode = cfg.eval.benchmark_chat_template
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has:
        raise EvalError("eval.benchmark_chat_template is 'always' but the model's tokenizer has no chat template")
    return mode == "always" or (mode == "auto" and has and cfg.data.template == "chat")


def run_benchmarks(
    model, tokenizer, cfg: RunConfig, manager, tasks: Sequence[str] | None = None, *, keep_samples: bool = False
) -> dict:
    """{task: {"lang", "acc", "acc_stderr", ("acc_norm", "acc_norm_stderr"), "n"}} for one loaded model, plus
    "_settings" (chat template, few-shot, limit), and with keep_samples "_samples": {task: [{"doc_id",
    "target", "loglikelihoods": one per choice}]}. Requests are batched by eval.batch_size."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks if tasks is not None else cfg.eval.benchmarks)
    chat = use_chat_template(cfg, tokenizer)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size, device=device)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        num_fewshot=cfg.eval.benchmark_num_fewshot,
        limit=cfg.eval.benchmark_limit,
        apply_chat_template=chat,
        log_samples=keep_samples,
        bootstrap_iters=1000,  # accuracy's stderr is analytic (a mean); the bootstrap serves other metrics only
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    results: dict = {}
    for task, metrics in out["results"].items():
        row: dict = {"lang": task_language(task), "n": (out.get("n-samples", {}).get(task) or {}).get("effective")}
        for key in METRIC_KEYS:
            if f"{key},none" in metrics:
                row[key] = _number(metrics[f"{key},none"])
                row[f"{key}_stderr"] = _number(metrics.get(f"{key}_stderr,none"))
        results[task] = row
    if keep_samples:
        results["_samples"] = {
            task: [
                {"doc_id": x["doc_id"], "target": x["target"], "loglikelihoods": [float(r[0][0]) for r in x["resps"]]}
                for x in samples
            ]
            for task, samples in out["samples"].items()
        }
    results["_settings"] = {
        "chat_template": chat,
        "num_fewshot": cfg.eval.benchmark_num_fewshot,
        "limit": cfg.eval.benchmark_limit,
        "lm_eval": lm_eval.__version__,
    }
    return results


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def benchmark_tasks(report_models: dict) -> list[str]:
    """Task names that any model in a report has, in first-seen order."""
    tasks: dict[str, None] = {}
    for m in report_models.values():
        for t in m.get("benchmarks", {}):
            if not t.startswith("_"):
                tasks[t] = None
    return list(tasks)


def benchmark_markdown_rows(report: dict) -> list[str]:
    """'| <task> (<lang>) acc (↑) | 0.600 ± 0.163 | ... |' rows, models as columns, for report.md."""
    models = list(report["models"])
    lines = []
    for task in benchmark_tasks(report["models"]):
        first = next(m["benchmarks"][task] for m in report["models"].values() if task in m.get("benchmarks", {}))
        lang = f" ({first['lang']})" if first.get("lang") else ""
        cells = []
        for label in models:
            r = report["models"][label].get("benchmarks", {}).get(task, {})
            cells.append(acc_cell(r.get("acc"), r.get("acc_stderr")))
        lines.append(f"| {task}{lang} accuracy (↑) | " + " | ".join(cells) + " |")
    return lines


def acc_cell(acc: float | None, stderr: float | None) -> str:
    if acc is None:
        return "–"
    return f"{acc:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")
