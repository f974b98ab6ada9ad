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

from clo_fast.evaluate.bootstrap import chance_bar, lower_bound, paired_bootstrap, rule_text, summarize, verdict
from clo_fast.evaluate.comparison_extra import extra_rows
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


def metric_names(langs: Sequence[str], keys: Sequence[str] | None = None) -> list[str]:
    """'fidelity/en', 'fidelity/sw', 'accuracy/en', ... in table order (only `keys`, when given)."""
    return [f"{key}/{lang}" for key, *_ in METRICS if keys is None or key in keys for lang in langs]


def prompt_scores(generations_path: str | Path, prompts: Sequence[dict] | None = None) -> dict:
    """Per-prompt scores from an evaluation's generations.jsonl: {"ids": {lang: [prompt id, ...]}, "scores":
    [PROMPT_SCORES present], "models": {label: {lang: {score: [1/0 per prompt, in the ids' order]}}}}.
    prompts: the evaluation items; those with "attribute" and "answer" (the world's) are scored for correctness."""
    from clo_fast.data.world import named_value, score_response

    answers = {(p["id"], p["lang"]): p for p in prompts or () if "answer" in p and "attribute" in p}
    rows = [json.loads(line) for line in Path(generations_path).read_text(encoding="utf-8").splitlines() if line]
    ids: dict[str, list] = {}
    models: dict[str, dict] = {}
    given: dict[str, dict] = {}  # label → lang → the value each response named in the prompt's language (or None)
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
            given.setdefault(r["model"], {}).setdefault(r["lang"], []).append(
                named_value(r["response"], item["attribute"], r["lang"])
            )
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
    out = {"ids": ids, "scores": present, "models": models}
    if "correct" in present:
        out["given"] = given
    return out


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


def prompt_units(scores: dict, prompts: Sequence[dict] | None) -> dict:
    """{"clusters": {lang: [entity per prompt]}, "parts": {lang: [part per prompt]}, "answers": {lang: [(attribute,
    right value) per prompt]}} for the scored prompts, from the items' "entity", "part", "attribute" and "answer"
    (the world's held-out items); without entities each prompt is its own cluster, without parts there are none,
    without answers no chance gate."""
    by_key = {(p["id"], p["lang"]): p for p in prompts or ()}
    clusters, parts, answers = {}, {}, {}
    for lang, ids in scores["ids"].items():
        items = [by_key.get((i, lang), {}) for i in ids]
        clusters[lang] = [it.get("entity", f"{lang}:{i}") for i, it in zip(ids, items, strict=True)]
        if all("part" in it for it in items):
            parts[lang] = [it["part"] for it in items]
        if all("answer" in it and "attribute" in it for it in items):
            answers[lang] = [(it["attribute"], it["answer"]) for it in items]
    return {"clusters": clusters, "parts": parts, "answers": answers}


def _slices(units: dict, lang: str, n: int) -> list[tuple[str, list[int]]]:
    """("", every prompt) then ("/part", its prompts) for each part."""
    out = [("", list(range(n)))]
    labels = units.get("parts", {}).get(lang)
    if labels:
        for part in sorted(set(labels)):
            out.append((f"/{part}", [i for i, x in enumerate(labels) if x == part]))
    return out


def _matrix(scores: dict, labels: list[str], lang: str, k: str):
    import numpy as np

    return np.array([scores["models"][label][lang][k] for label in labels], dtype=np.float64).T


def differences(
    scores: dict, groups: dict[str, list[str]], reference: str, units: dict | None = None, only=None
) -> dict[str, dict[str, dict]]:
    """method → "score/lang[/part]" → paired bootstrap of (method − reference) over entities × seeds (clusters
    from `units`; prompts when None): seed i of the method is paired with seed i of the reference, prompt p with
    prompt p. A reference of one model (the base) is paired with every seed. only: these methods (default all)."""
    units = units or {}
    ref_labels = groups[reference]
    out = {}
    for name, labels in groups.items():
        if name == reference or (only is not None and name not in only):
            continue
        if len(labels) != len(ref_labels) and len(ref_labels) != 1:
            raise ValueError(f"method {name!r} has {len(labels)} seeds, {reference!r} {len(ref_labels)}: not paired")
        per = {}
        for lang, ids in scores["ids"].items():
            clusters = units.get("clusters", {}).get(lang)
            for k in scores["scores"]:
                d = _matrix(scores, labels, lang, k) - _matrix(scores, ref_labels, lang, k)
                for suffix, rows in _slices(units, lang, len(ids)):
                    c = None if clusters is None else [clusters[i] for i in rows]
                    per[f"{k}/{lang}{suffix}"] = paired_bootstrap(d[rows], c)
        out[name] = per
    return out


def competence(scores: dict, groups: dict[str, list[str]], units: dict) -> dict[str, dict[str, dict]]:
    """group → "score/lang[/part]" → {"mean", "lower" (one-sided lower bound, cluster bootstrap), "chance" (the
    group's bar: `bootstrap.chance_bar` of its own answers), "above"} for the correctness scores of prompts that
    carry answers (chance is defined there only)."""
    out: dict = {}
    for name, labels in groups.items():
        per = {}
        for lang, ids in scores["ids"].items():
            clusters = units.get("clusters", {}).get(lang)
            truth = units.get("answers", {}).get(lang)
            if truth is None or "given" not in scores:
                continue
            for k in ("correct", "correct_in_lang"):
                if k not in scores["scores"]:
                    continue
                v = _matrix(scores, labels, lang, k)
                for suffix, rows in _slices(units, lang, len(ids)):
                    if k == "correct":  # any language: the value named, whichever language it is named in
                        continue
                    given = [[scores["given"][label][lang][i] for i in rows] for label in labels]
                    bar = chance_bar(given, [truth[i][0] for i in rows], [truth[i][1] for i in rows])
                    lo = lower_bound(v[rows], None if clusters is None else [clusters[i] for i in rows])
                    per[f"{k}/{lang}{suffix}"] = {"mean": float(v[rows].mean()), "lower": lo, "chance": bar,
                                                  "above": lo > bar}  # fmt: skip
        out[name] = per
    return out


def claim_verdicts(
    scores: dict,
    groups: dict[str, list[str]],
    claims: Sequence[tuple],
    target_lang: str,
    units: dict | None = None,
    comp: dict | None = None,
) -> list[dict]:
    """Each claim (id, statement, method, versus, language or "tgt", part or None, kind) decided by
    `bootstrap.verdict` on method − versus in the strictest per-prompt score present ("correct_in_lang", else
    fidelity), on the prompts of its part (all when the prompts have no parts); testable when either side is above
    chance on that measure (`competence`, `comp`), competent when the method is; "not run" when a side was not part
    of the comparison."""
    units = units or {}
    comp = comp if comp is not None else competence(scores, groups, units)
    out = []
    for cid, statement, method, versus, lang, part, kind in claims:
        lang = target_lang if lang == "tgt" else lang
        rec = {"id": cid, "claim": statement, "method": method, "versus": versus, "lang": lang, "kind": kind}
        if method not in groups or versus not in groups:
            out.append({**rec, "part": part, "verdict": "not run"})
            continue
        score = next(k for k in reversed(PROMPT_SCORES) if k in scores["scores"])
        has_part = part is not None and bool(units.get("parts", {}).get(lang))
        key = f"{score}/{lang}" + (f"/{part}" if has_part else "")
        d = differences(scores, {method: groups[method], versus: groups[versus]}, versus, units)[method][key]
        gate_a, gate_b = comp.get(method, {}).get(key), comp.get(versus, {}).get(key)
        testable = gate_a is None or gate_b is None or gate_a["above"] or gate_b["above"]
        competent = gate_a is None or gate_a["above"]
        gates = {"method_gate": gate_a, "versus_gate": gate_b}
        out.append(
            {
                **rec,
                "part": part if has_part else None,
                "score": score,
                **d,
                **gates,
                "verdict": verdict(kind, d["lo"], d["hi"], testable=testable, competent=competent),
            }
        )
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
    lines += extra_rows(comp, methods)
    diffs = comp.get("differences") or {}
    ref = comp.get("reference_method")
    names = {"fidelity": "in prompt language", "correct": "correct", "correct_in_lang": "correct and in language"}
    if diffs and ref in comp["methods"]:
        others = [m for m in methods if m in diffs]
        lines += [
            "",
            f"Difference from {comp['methods'][ref]['title']} per prompt (method − {ref}, mean over prompts × seeds) "
            "with its 95% interval [paired bootstrap over entities × seeds]; parts: entities known in Swahili from "
            "pretraining, English-only entities (transfer):",
            "",
            "| per-prompt score | " + " | ".join(comp["methods"][m]["title"] for m in others) + " |",
            "|---|" + "---:|" * len(others),
        ]
        for key in diffs[others[0]]:
            score, lang, *part = key.split("/")
            label = f"{names[score]} {lang}" + (f", {part[0]}" if part else "")
            lines.append(f"| {label} | " + " | ".join(_interval(diffs[m][key]) for m in others) + " |")
    gates = comp.get("competence") or {}
    if gates:
        keys = [k for k in next(iter(gates.values())) if k.startswith("correct_in_lang/")]
        groups = ["base", *methods]
        lines += [
            "",
            "Above chance? Correct and in language: mean (one-sided 95% lower bound over entities × seeds / the "
            "bar: 1/6 or the model's own answers shuffled across entities, whichever is higher): ✓ above, · not.",
            "",
            "| prompts | " + " | ".join("base" if g == "base" else comp["methods"][g]["title"] for g in groups) + " |",
            "|---|" + "---:|" * len(groups),
        ]
        for key in keys:
            _, lang, *part = key.split("/")
            cells = []
            for g in groups:
                x = gates.get(g, {}).get(key)
                mark = "" if x is None else "✓" if x["above"] else "·"
                cells.append("" if x is None else f"{x['mean']:.3f} ({x['lower']:.3f} / {x['chance']:.3f}) {mark}")
            lines.append(f"| {lang}{', ' + part[0] if part else ''} | " + " | ".join(cells) + " |")
    if comp.get("claims"):
        lines += ["", "The paper's claims, each decided on the per-prompt score named. " + rule_text(), ""]
        for c in comp["claims"]:
            if c["verdict"] == "not run":
                lines.append(f"- ({c['id']}) {c['claim']}: not run (no {c['method']} or {c['versus']} runs)")
                continue
            where = f"{c['lang']} prompts" + (f", {c['part']} entities" if c.get("part") else "")
            t = c.get("t")
            check = f"; per-seed t [{t['lo']:+.3f}, {t['hi']:+.3f}]" if t else ""
            lines.append(
                f"- ({c['id']}) {c['claim']}: **{c['verdict']}** — {c['method']} − {c['versus']}, {c['score']} on "
                f"{where}: {_interval(c)}{check}"
            )
    return "\n".join(lines) + "\n"


def render_search_markdown(search: dict, target_lang: str) -> str:
    """The settings search: each method's grid on the validation entities, the chosen setting marked."""
    lines = [
        f"Settings chosen on the validation entities (grid `{search['grid']}`, search seeds "
        f"{', '.join(map(str, search['seeds']))}); rule: {search['rule']}.",
        "",
        f"| method | setting | en correct & in language | {target_lang} correct & in language | criterion | chosen |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for info in search["methods"].values():
        for row in info["settings"]:
            en = sum(x["en"] for x in row["per_seed"]) / len(row["per_seed"])
            tg = sum(x[target_lang] for x in row["per_seed"]) / len(row["per_seed"])
            mark = "**✓**" if row["id"] == info["chosen"] else ""
            lines.append(f"| {info['title']} | {row['id']} | {en:.3f} | {tg:.3f} | {row['criterion']:.3f} | {mark} |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(search: dict, target_lang: str, path: str | Path) -> bool:
    """PNG: each method's English-vs-target trade-off across its grid on the validation entities (mean over the
    search seeds), the chosen setting circled, the base as a cross. False if matplotlib is missing."""
    fig = new_figure(6.5, 5.0, 110)
    if fig is None:
        return False
    ax = fig.subplots()
    colors = ["#2a5a8a", "#b04a2f", "#3c8a3c", "#8a3c8a", "#8a7a2a"]
    base = None
    for i, info in enumerate(search["methods"].values()):
        c = colors[i % len(colors)]
        xs, ys = [], []
        for row in info["settings"]:
            xs.append(sum(x["en"] for x in row["per_seed"]) / len(row["per_seed"]))
            ys.append(sum(x[target_lang] for x in row["per_seed"]) / len(row["per_seed"]))
            ax.annotate(row["id"], (xs[-1], ys[-1]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if row["id"] == info["chosen"]:
                ax.plot(xs[-1], ys[-1], "o", markersize=13, markerfacecolor="none", markeredgecolor=c)
        ax.plot(xs, ys, "o", color=c, label=info["title"])
        base = info.get("base", base)
    if base is not None:
        ax.plot(base["en"], base[target_lang], "x", color="black", markersize=8, label="base")
    ax.set_xlabel("English: correct and in language (validation)")
    ax.set_ylabel(f"{target_lang}: correct and in language (validation)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.axhline(1 / 6, color="grey", linestyle=":", linewidth=1)
    ax.axvline(1 / 6, color="grey", linestyle=":", linewidth=1)
    ax.set_title("Each method's grid: English vs target (circled: chosen)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(str(path))
    return True


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
    """compare.json, compare.md, compare.png (and with a search, search.png: the trade-off) under out_dir; returns
    their names (relative: the folder can be moved or committed)."""
    out = Path(out_dir)
    files = {"json": out / "compare.json", "markdown": out / "compare.md", "plot": out / "compare.png"}
    if not plot_comparison(comp, files["plot"]):
        files.pop("plot")
    md = render_comparison_markdown(comp)
    if comp.get("search"):
        files["tradeoff"] = out / "search.png"
        if not plot_tradeoff(comp["search"], comp["target_lang"], files["tradeoff"]):
            files.pop("tradeoff")
        md = render_search_markdown(comp["search"], comp["target_lang"]) + "\n" + md
    comp["files"] = {k: v.name for k, v in files.items()}
    files["markdown"].write_text(md, encoding="utf-8")
    files["json"].write_text(json.dumps(comp, ensure_ascii=False, indent=1), encoding="utf-8")
    return comp["files"]
