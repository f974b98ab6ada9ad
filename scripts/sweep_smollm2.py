"""The learning-rate sweep behind configs/smollm2_sw.yaml: which lr teaches SmolLM2-135M-Instruct Swahili with CLO
and keeps its English, chosen on validation prompts the README's test prompts never see.

    python scripts/sweep_smollm2.py                     # about 1 h on the 2-core CPU machine, unloaded
    python scripts/sweep_smollm2.py --lrs 1e-5 3e-5     # other grid; finished runs are reused

Splits (one seeded order over the 135 demo pairs, data/split.py): the config's test split is its first 30%
(40 pairs); the sweep holds out its first 45% (61 pairs) and trains on the rest, so its validation prompts are the
held-out pairs that are not test pairs (21). Every run: the config as it is but lr, data.eval_fraction and its
folders; all share one reference cache. Then one evaluator run scores the base and every run on the validation
prompts, and SELECTION (below, fixed before the runs) picks the lr. Writes OUT/sweep.json and OUT/sweep.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "smollm2_sw.yaml"
SWEEP_EVAL_FRACTION = 0.45
ENGLISH_NLL_MARGIN = 0.05  # English kept: validation English NLL/token at most 5% above the base's
SELECTION = (
    "a setting keeps English when its validation English reference NLL/token is at most "
    f"{1 + ENGLISH_NLL_MARGIN:.2f}x the base's and its English loop rate is no higher than the base's; among those, "
    "the highest Swahili fidelity (in Swahili, no echo, no loop) wins, ties broken by Swahili chrF; if none keeps "
    "English, none is chosen and the sweep says so"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])
    ap.add_argument("--out", default="outputs/smollm2_sweep")
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir (default: the config's)")
    ap.add_argument("--master-port", type=int, default=29631)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = ["--set", f"data.cache_dir={a.cache_dir}"] if a.cache_dir else []

    # 1. the runs (a finished run, its hf_model written, is reused)
    runs = {}
    for lr in a.lrs:
        run = out / f"lr{lr:g}"
        runs[f"lr {lr:g}"] = run / "run" / "hf_model"
        if (run / "run" / "hf_model" / "config.json").is_file():
            print(f"[sweep] lr {lr:g}: finished earlier, reused", flush=True)
            continue
        sets = {"optim.lr": lr, "data.eval_fraction": SWEEP_EVAL_FRACTION, "train.output_dir": run / "run",
                "data.output_dir": out / "data", "train.reference_dir": out / "ref_data", "train.run_evaluation": False,
                "eval.output_dir": run / "eval", "train.eval_steps": 9}  # fmt: skip
        train = str(ROOT / "clo_fast" / "train.py")
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(a.master_port), train, "--config", str(CONFIG),
               *cache] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]  # fmt: skip
        print("[sweep] " + " ".join(cmd), flush=True)
        with open(run.with_suffix(".log"), "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            sys.exit(f"[sweep] lr {lr:g} failed (exit {rc}): see {run.with_suffix('.log')}")

    # 2. the validation prompts: held out by the sweep, not by the config (its test prompts)
    from clo_fast.config import load_config
    from clo_fast.data import load_or_build_text_dataset
    from clo_fast.evaluate import evaluate_models
    from clo_fast.pretrained import resolve_model_path

    cache_set = [f"data.cache_dir={a.cache_dir}"] if a.cache_dir else []
    cfg = load_config(
        CONFIG, [f"data.output_dir={out / 'data'}", f"data.eval_fraction={SWEEP_EVAL_FRACTION}"] + cache_set
    )
    test_cfg = load_config(CONFIG, [f"data.output_dir={out / 'test_data'}"] + cache_set)
    held_out = load_or_build_text_dataset(cfg.data)[0]["eval"]
    test_ids = set(load_or_build_text_dataset(test_cfg.data)[0]["eval"]["id"])
    val = [dict(r) for r in held_out if r["id"] not in test_ids]
    assert val and not ({r["id"] for r in val} & test_ids)
    cfg.eval.max_prompts = len(val)
    base = resolve_model_path(cfg.model.name_or_path, cfg.data.cache_dir, cfg.model.gguf_file)
    report = evaluate_models(
        cfg, [("base", base), *[(k, str(v)) for k, v in runs.items()]], prompts=val, out_dir=out / "val_eval"
    )

    # 3. the rule
    m = {label: info["metrics"] for label, info in report["models"].items()}
    rows = []
    for label in runs:
        keeps = (
            m[label]["en"]["nll_per_token"] <= (1 + ENGLISH_NLL_MARGIN) * m["base"]["en"]["nll_per_token"]
            and m[label]["en"]["loop_rate"] <= m["base"]["en"]["loop_rate"]
        )
        rows.append((label, keeps, m[label]["sw"]["fidelity"], m[label]["sw"]["chrf"]))
    kept = [r for r in rows if r[1]]
    chosen = max(kept, key=lambda r: (r[2], r[3]))[0] if kept else None
    result = {"selection_rule": SELECTION, "chosen": chosen, "validation_prompts": len(val),
              "val_ids": [r["id"] for r in val], "runs": {k: str(v) for k, v in runs.items()},
              "keeps_english": {r[0]: r[1] for r in rows}, "metrics": m,
              "english_warnings": {k: english_warnings(v.parent.parent.with_suffix(".log")) for k, v in runs.items()},
              }  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    (out / "sweep.md").write_text(sweep_markdown(result, list(m)))
    print((out / "sweep.md").read_text())


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
