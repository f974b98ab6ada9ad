"""CLO vs SFT vs DPO from one run config over several seeds: the CLO paper's claim in miniature.

    python -m clo_fast.compare --config configs/demo.yaml                         # SFT, DPO, CLO × seeds 0 1 2
    python -m clo_fast.compare --config configs/demo.yaml --lams 0.25 0.75        # + CLO at other λ
    python -m clo_fast.compare --config configs/demo.yaml --layers mlp all        # + which layers train (CLO)
    python -m clo_fast.compare --config configs/demo.yaml --seeds 0 1 2 3 4 --set optim.epochs=6

Each (method, seed) is one run of clo_fast/train.py: by default one process, with the config's gradient
accumulation times --as-ranks (default 2), so that its global batch, and so its result, equal a 2-rank launch of
the same config (the README's demo: the CLO run of seed 0 is the demo's own run). On GPUs, --launcher
"deepspeed --num_gpus 8" (or "torchrun --nproc_per_node 8") launches each run on several ranks; --as-ranks is then
1 unless given. The seed is optim.seed
(data order and every RNG); the held-out split (data.seed) is the same for every run. The runs share the built
demo model, the tokenized-data cache and one reference log-prob cache (train.reference_dir). Then the base and
every trained model are evaluated on the same held-out prompts (clo_fast.evaluate: fidelity, chrF against the
reference answer, reference NLL), and each method's metrics are summarised over its seeds.

Outputs in --out-dir (default: next to train.output_dir, in `compare`): runs/<method>-s<seed>/ (each run's own
folder, with train.log), ref_data/, eval/ (report.*, generations.jsonl), compare.json (per method: per-seed
values, mean and standard deviation of every metric), compare.md and compare.png. Started again with the same
settings, it reuses finished runs and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clo_fast import numerics
from clo_fast.atomic import OutputDirError, RunLock, claim_output_dir, write_text_atomic
from clo_fast.config import ConfigError, RunConfig, add_override_argument, load_config, validate_output_locations
from clo_fast.constants import LAYER_ABLATION_PATTERNS
from clo_fast.evaluate.comparison_extra import check_evaluation_extras
from clo_fast.training.distributed import LAUNCHER_ENV

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
RUN_MARKER = "compare_run.json"  # in each run folder: the settings it was started with, and whether it finished
# fields compare sets for each run; a --set of one of them would be silently replaced, so it is refused
CONTROLLED = (
    "clo.mode",
    "clo.lam",
    "optim.seed",
    "optim.gradient_accumulation_steps",
    "model.trainable_patterns",
    "train.output_dir",
    "train.reference_dir",
    "train.run_evaluation",
    "train.push_to_hub",
)


class CompareError(RuntimeError):
    pass


@dataclass(frozen=True)
class Method:
    name: str  # folder and model-label prefix
    title: str  # table column
    short: str  # plot tick
    overrides: tuple[str, ...]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (configs/demo.yaml for the bundled demo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="optim.seed of each run (default 0 1 2)")
    p.add_argument(
        "--methods", nargs="+", default=["sft", "dpo", "clo"], choices=["sft", "dpo", "clo"], help="default: all three"
    )
    p.add_argument("--lams", type=float, nargs="*", default=[], help="extra CLO runs at these λ (the λ sweep)")
    p.add_argument(
        "--layers",
        nargs="*",
        default=[],
        choices=sorted(LAYER_ABLATION_PATTERNS),
        help="extra CLO runs training only these layers (the paper's ablation; attention is CLO's default)",
    )
    p.add_argument(
        "--launcher",
        default=None,
        help='command that launches each run, e.g. "deepspeed --num_gpus 8"; default: one python process',
    )
    p.add_argument(
        "--as-ranks",
        type=int,
        default=None,
        help="each run's gradient accumulation is multiplied by this, so that one process has the global batch "
        "of a launch on this many ranks (default 2 without --launcher: the README's demo launch; 1 with one)",
    )
    p.add_argument("--out-dir", default=None, help="default: <train.output_dir>/../compare")
    p.add_argument(
        "--overwrite", action="store_true", help="re-train runs whose folder holds a run with other settings"
    )
    add_override_argument(p)
    return p.parse_args(argv)


def plan_methods(cfg: RunConfig, methods: list[str], lams: list[float], layers: list[str]) -> list[Method]:
    """The methods to train, in table order; a λ or layer set equal to CLO's own is not trained twice."""
    lam = cfg.clo.lam
    base = {
        "sft": Method("sft", "SFT (λ=1)", "SFT", ("clo.mode=sft",)),
        "dpo": Method("dpo", "DPO (λ=0)", "DPO", ("clo.mode=dpo",)),
        "clo": Method("clo", f"CLO (λ={lam:g})", f"CLO\nλ={lam:g}", ("clo.mode=clo", f"clo.lam={lam!r}")),
    }
    plan = [base[m] for m in methods]
    for x in lams:
        if not 0.0 <= x <= 1.0:
            raise ConfigError(f"--lams: λ must be in [0, 1], got {x}")
        plan.append(Method(f"clo-lam{x:g}", f"CLO (λ={x:g})", f"CLO\nλ={x:g}", ("clo.mode=clo", f"clo.lam={x!r}")))
    if layers and cfg.model.lora is not None:
        raise ConfigError("--layers: model.lora is set; the layer ablation trains full weights (drop model.lora)")
    for layer in layers:
        patterns = list(LAYER_ABLATION_PATTERNS[layer])
        title = {"attention": "CLO, attention only", "mlp": "CLO, MLP only", "all": "CLO, all layers"}[layer]
        overrides = ("clo.mode=clo", f"clo.lam={lam!r}", f"model.trainable_patterns={json.dumps(patterns)}")
        plan.append(Method(f"clo-{layer}", title, title.replace(", ", "\n"), overrides))
    unique, seen = [], set()
    for m in plan:
        # the config's own layers at CLO's λ is the clo run: an override equal to the config is dropped
        key = tuple(sorted(o for o in m.overrides if _patterns_of(o) != list(cfg.model.trainable_patterns)))
        if key not in seen:
            seen.add(key)
            unique.append(m)
    return unique


def _patterns_of(override: str) -> list[str] | None:
    name, _, value = override.partition("=")
    return json.loads(value) if name == "model.trainable_patterns" else None


def run_overrides(cfg: RunConfig, method: Method, seed: int, run_dir: Path, ref_dir: Path, as_ranks: int) -> list[str]:
    return [
        *method.overrides,
        f"optim.seed={seed}",
        f"optim.gradient_accumulation_steps={cfg.optim.gradient_accumulation_steps * as_ranks}",
        f"train.output_dir={json.dumps(str(run_dir))}",
        f"train.reference_dir={json.dumps(str(ref_dir))}",
        "train.run_evaluation=false",
        "train.push_to_hub=null",
    ]


def train_command(launcher: str | None, config: Path, overrides: list[str]) -> list[str]:
    """The command line of one run: `<launcher> clo_fast/train.py --config ... --set ...`."""
    import shlex

    cmd = shlex.split(launcher) if launcher else [sys.executable]
    cmd += [str(TRAIN_SCRIPT), "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def train_run(config: Path, overrides: list[str], run_dir: Path, overwrite: bool, launcher: str | None = None) -> dict:
    """One training run in its own process, its output in run_dir/train.log. A finished run with the same
    settings is reused; an interrupted one resumes from its latest checkpoint."""
    marker = run_dir / RUN_MARKER
    # what the run's result depends on: the config file's content (not its path: an edited file is another run)
    # and the overrides; the path is recorded for the reader only
    settings = {"config_sha256": _sha256(config), "overrides": overrides, "launcher": launcher}
    extra: list[str] = []  # a fresh run unless the folder holds this run's checkpoints, or another run's
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in settings} != settings:
            if not overwrite:
                raise CompareError(
                    f"{run_dir} holds a run started with other settings ({marker}); use another --out-dir, "
                    "or --overwrite to train it again"
                )
            extra = ["--set", "train.overwrite_output_dir=true"]
        elif done.get("finished") and (run_dir / "hf_model" / "config.json").is_file():
            return {**done, "reused": True}
        elif (run_dir / "checkpoints" / "latest").is_file():
            extra = ["--resume"]
    claim_output_dir(run_dir, "compare run folder", "train_run")
    write_text_atomic(marker, json.dumps({**settings, "config": str(config), "finished": False}))
    cmd = train_command(launcher, config, overrides)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}  # the run's own launch, not ours
    t0 = time.time()
    with (run_dir / "train.log").open("a") as log:
        rc = subprocess.run(cmd + extra, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = round(time.time() - t0, 1)
    if rc != 0:
        tail = "\n".join((run_dir / "train.log").read_text(errors="replace").splitlines()[-15:])
        raise CompareError(f"training run {run_dir.name} failed (exit {rc}); the end of {run_dir}/train.log:\n{tail}")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    done = {**settings, "config": str(config), "finished": True, "seconds": seconds, "final_metrics": final}
    write_text_atomic(marker, json.dumps(done))
    return done


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_launcher(launcher: str | None) -> None:
    """The --launcher program exists (else every run would fail with a raw FileNotFoundError)."""
    import shlex
    import shutil

    if launcher is None:
        return
    argv = shlex.split(launcher)
    if not argv or shutil.which(argv[0]) is None:
        raise ConfigError(f"--launcher {launcher!r}: {argv[0] if argv else 'the command'} is not found on PATH")


def versions() -> dict:
    import deepspeed
    import sacrebleu
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "sacrebleu": sacrebleu.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu_numerics": numerics.describe(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    config = Path(args.config)
    cfg = load_config(config, args.set)  # validated once, before anything runs
    clash = [s for s in args.set if s.split("=", 1)[0].strip() in CONTROLLED]
    if clash:
        raise ConfigError(f"--set {clash[0]}: compare sets this field for each run ({', '.join(CONTROLLED)})")
    if args.as_ranks is None:
        args.as_ranks = 1 if args.launcher else 2
    if args.as_ranks < 1 or not args.seeds:
        raise ConfigError("--as-ranks must be >= 1 and --seeds must name at least one seed")
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:  # refused, not deduplicated: a repeat would count one run twice (n too large, spread too small)
        raise ConfigError(f"--seeds: {', '.join(map(str, repeated))} given more than once; name each seed once")
    bad = [s for s in args.seeds if not 0 <= s < 2**32]
    if bad:
        raise ConfigError(f"--seeds: {bad[0]} is out of range (a seed is in [0, 2**32))")
    check_launcher(args.launcher)
    methods = plan_methods(cfg, args.methods, args.lams, args.layers)
    check_evaluation_extras(cfg)  # benchmark names and the judge, before minutes of training
    out_dir = Path(args.out_dir or Path(cfg.train.output_dir).parent / "compare")
    validate_output_locations(cfg, lambda name: str(config), {"--out-dir": str(out_dir)})
    out = claim_output_dir(out_dir, "--out-dir", "compare")
    lock = RunLock(out).acquire()  # one compare per folder: a second one would train into the same run folders
    atexit.register(lock.release)
    t0 = time.time()

    # train: every method × seed, one process each
    runs: dict[str, dict] = {}
    for m in methods:
        for seed in args.seeds:
            label = f"{m.name}/s{seed}"
            run_dir = out / "runs" / f"{m.name}-s{seed}"
            overrides = [*args.set, *run_overrides(cfg, m, seed, run_dir, out / "ref_data", args.as_ranks)]
            print(f"[compare] training {label} → {run_dir}", flush=True)
            done = train_run(config, overrides, run_dir, args.overwrite, args.launcher)
            runs[label] = {**done, "run_dir": str(run_dir)}
            how = "finished earlier, reused" if runs[label].get("reused") else "trained"
            print(f"[compare] {label}: {runs[label]['seconds']:.0f} s ({how})", flush=True)

    # evaluate: the base and every trained model on the same held-out prompts
    from clo_fast.evaluate import evaluate_models
    from clo_fast.evaluate.comparison import aggregate, write_comparison
    from clo_fast.evaluate.comparison_extra import aggregate_extra, compare_judge_pairs
    from clo_fast.pretrained import resolve_model_path

    base_path = resolve_model_path(cfg.model.name_or_path, cfg.data.cache_dir)
    specs = [("base", base_path)] + [(label, str(Path(run["run_dir"]) / "hf_model")) for label, run in runs.items()]
    judge_pairs = compare_judge_pairs([m.name for m in methods], args.seeds)  # each method vs SFT, seed by seed
    report = evaluate_models(cfg, specs, out_dir=out / "eval", pairs_to_judge=judge_pairs)

    # summarise over seeds and write the files
    groups = {m.name: [f"{m.name}/s{s}" for s in args.seeds] for m in methods}
    summary = aggregate(report, {"base": ["base"], **groups})
    extra = aggregate_extra(report, {"base": ["base"], **groups})  # benchmarks, judge win rates
    comp = {
        "config": str(config),
        "overrides": args.set,
        "target_lang": report["target_lang"],
        "languages": report["languages"],
        "n_prompts": report["n_prompts"],
        "seeds": args.seeds,
        "as_ranks": args.as_ranks,
        "launcher": args.launcher,
        "reference_method": "clo",
        "base": summary.pop("base"),
        "extra": extra,
        "judge_versus": "SFT" if judge_pairs else None,
        "methods": {
            m.name: {
                "title": m.title,
                "short": m.short,
                "overrides": list(m.overrides),
                "metrics": summary[m.name],
                "train_seconds": [runs[f"{m.name}/s{s}"].get("seconds") for s in args.seeds],
            }
            for m in methods
        },
        "seconds": round(time.time() - t0, 1),  # this invocation, reused runs not counted again
        "runs_trained": sum(not r.get("reused") for r in runs.values()),
        "runs_reused": sum(bool(r.get("reused")) for r in runs.values()),
        "versions": versions(),
    }
    files = write_comparison(comp, out)
    print("\n" + (out / files["markdown"]).read_text())
    print(f"[compare] {out.resolve()}: " + ", ".join(files.values()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, OutputDirError, CompareError) as e:
        print(f"[compare] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
