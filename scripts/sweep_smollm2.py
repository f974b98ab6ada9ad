"""The learning-rate sweep behind configs/smollm2_sw.yaml: which lr teaches SmolLM2-135M-Instruct Swahili with CLO
and keeps its English, chosen on validation prompts the README's test prompts never see.

    python scripts/sweep_smollm2.py                     # about 1 h on the 2-core CPU machine, unloaded
    python scripts/sweep_smollm2.py --lrs 1e-5 3e-5     # other grid; finished runs are reused

Splits (one seeded order over the 135 demo pairs, data/split.py): the config holds out its first 45% (61 pairs;
the quality gate drops one, 60 remain) and trains on the other 74. The held-out pairs keep the seeded order: the
first `eval.max_prompts` (40) are the test prompts, which the README's table and the config's own evaluation use;
the other 20 are the validation prompts this sweep chooses on. Every run: the config as it is but lr and its
folders; all share one reference cache. One evaluator run scores the base and every run on the validation prompts,
SELECTION (below, fixed before the runs) picks the lr, and a last evaluator run scores the base and the chosen run
on the test prompts, with the shipped lm-eval task: the README's table (OUT/test_eval/report.md). Each run is the
one `deepspeed ... --config configs/smollm2_sw.yaml --set optim.lr=LR` trains. Writes OUT/sweep.json, OUT/sweep.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2_sw.yaml"
ENGLISH_NLL_MARGIN = 0.05  # English kept: validation English NLL/token at most 5% above the base's
SELECTION = (
    "a setting keeps English when its validation English reference NLL/token is at most "
    f"{1 + ENGLISH_NLL_MARGIN:.2f}x the base's and its English loop rate is no higher than the base's; among those, "
    "the highest Swahili fidelity (in Swahili, no echo, no loop) wins, ties broken by Swahili chrF; if none keeps "
    "English, none is chosen and the sweep says so"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])  # the grid, fixed before the runs
    ap.add_argument("--out", default="outputs/smollm2_sweep")
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir (default: the config's)")
    ap.add_argument("--master-port", type=int, default=29631)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = [f"data.cache_dir={a.cache_dir}"] if a.cache_dir else []

    # 1. the runs (a finished run, its hf_model written, is reused)
    runs = {}
    for lr in a.lrs:
        run = out / f"lr{lr:g}"
        log = out / f"lr{lr:g}.log"
        runs[f"lr {lr:g}"] = run / "run" / "hf_model"
        if (run / "run" / "hf_model" / "config.json").is_file():
            print(f"[sweep] lr {lr:g}: finished earlier, reused", flush=True)
            continue
        sets = {"optim.lr": lr, "train.output_dir": run / "run", "data.output_dir": out / "data",
                "train.reference_dir": out / "ref_data", "train.run_evaluation": False,
                "eval.output_dir": run / "eval"}  # fmt: skip
        train = str(ROOT / "clo_fast" / "train.py")
        sets |= dict(c.split("=", 1) for c in cache)
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(a.master_port), train, "--config", str(CONFIG)]
        cmd += [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
        print("[sweep] " + " ".join(cmd), flush=True)
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            sys.exit(f"[sweep] lr {lr:g} failed (exit {rc}): see {log}")

    # 2. the validation prompts: the held-out pairs after the test prompts
    from clo_fast.config import load_config
    from clo_fast.data import load_or_build_text_dataset
    from clo_fast.evaluate import evaluate_models
    from clo_fast.pretrained import resolve_model_path

    cfg = load_config(CONFIG, [f"data.output_dir={out / 'data'}"] + cache)
    held_out = [dict(r) for r in load_or_build_text_dataset(cfg.data)[0]["eval"]]
    n_test = cfg.eval.max_prompts
    test, val = held_out[:n_test], held_out[n_test:]
    assert len(test) == n_test and val
    base = resolve_model_path(cfg.model.name_or_path, cfg.data.cache_dir, cfg.model.gguf_file)
    val_cfg = load_config(CONFIG, [f"data.output_dir={out / 'data'}", f"eval.max_prompts={len(val)}",
                                   "eval.benchmarks=[]"] + cache)  # fmt: skip
    report = evaluate_models(
        val_cfg, [("base", base), *[(k, str(v)) for k, v in runs.items()]], prompts=val, out_dir=out / "val_eval"
    )

    # 3. the rule
    m = {label: info["metrics"] for label, info in report["models"].items()}
    keeps, chosen = choose(m, list(runs))
    result = {"selection_rule": SELECTION, "chosen": chosen, "validation_prompts": len(val),
              "val_ids": [r["id"] for r in val], "runs": {k: str(v) for k, v in runs.items()},
              "keeps_english": keeps, "metrics": m,
              "english_warnings": {k: english_warnings(v.parent.parent.parent / f"{v.parent.parent.name}.log")
                                   for k, v in runs.items()},
              }  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "sweep.md").write_text(sweep_markdown(result, list(m)))
    print((out / "sweep.md").read_text())

    # 4. the chosen run against the base on the test prompts (the README's table; the config's own evaluation)
    if chosen is not None:
        evaluate_models(cfg, [("base", base), ("trained", str(runs[chosen]))], prompts=test, out_dir=out / "test_eval")
        print((out / "test_eval" / "report.md").read_text())


def choose(m: dict, labels: list[str]) -> tuple[dict, str | None]:
    """SELECTION on validation metrics `m` (label → language → metrics; "base" among them): ({label: keeps English},
    the chosen label or None)."""
    base = m["base"]["en"]
    keeps = {
        x: m[x]["en"]["nll_per_token"] <= (1 + ENGLISH_NLL_MARGIN) * base["nll_per_token"]
        and m[x]["en"]["loop_rate"] <= base["loop_rate"]
        for x in labels
    }
    kept = [x for x in labels if keeps[x]]
    chosen = max(kept, key=lambda x: (m[x]["sw"]["fidelity"], m[x]["sw"]["chrf"])) if kept else None
    return keeps, chosen


def english_warnings(log: Path) -> list[str]:
    """The English guard's warnings in a run's log (train.english_nll_warn)."""
    if not log.is_file():
        return []
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if "English is degrading" in line]


def sweep_markdown(result: dict, labels: list[str]) -> str:
    m = result["metrics"]

    def cell(label, lang, key, digits):
        v = m[label][lang].get(key)
        ci = m[label][lang].get("ci95", {}).get(key)
        return "–" if v is None else f"{v:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")

    head = ["| validation metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    keys = [("fidelity", 3), ("echo_rate", 3), ("loop_rate", 3), ("finished_share", 3), ("chrf", 1),
            ("nll_per_token", 3)]  # fmt: skip
    body = [
        f"| {k} {lang} | " + " | ".join(cell(x, lang, k, d) for x in labels) + " |"
        for k, d in keys
        for lang in ("en", "sw")
    ]
    keeps = (
        "| keeps English (rule) | – | "
        + " | ".join("yes" if result["keeps_english"][x] else "no" for x in labels[1:])
        + " |"
    )
    chosen = result["chosen"] or "none: no setting kept English"
    warned = [f"- {k}: {w[0].split('warning: ', 1)[-1][:160]}..." for k, w in result["english_warnings"].items() if w]
    return "\n".join(
        [f"Validation prompts: {result['validation_prompts']} per language.", "", *head, *body, keeps, "",
         f"Rule (fixed before the runs): {result['selection_rule']}.", "", f"Chosen: **{chosen}**.", "",
         "The English guard's warnings while training:" if warned else "The English guard warned in no run.",
         *warned, ""]
    )  # fmt: skip


if __name__ == "__main__":
    main()
