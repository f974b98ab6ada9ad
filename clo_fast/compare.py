"""CLO vs the paper's baselines from one run config over several seeds, with the paper's three claims decided.

    python -m clo_fast.compare --config configs/world.yaml    # the miniature fact world: each method's settings
                                                              # searched on validation entities (seeds 100, 101),
                                                              # then SFT, CLO, CLO at half the pairs × seeds 0-4 on
                                                              # the test entities; the claims' verdicts
    python -m clo_fast.compare --config configs/demo.yaml --lams 0.25 0.75        # + CLO at other λ
    python -m clo_fast.compare --config configs/demo.yaml --layers mlp all        # + which layers train (CLO)
    python -m clo_fast.compare --config configs/demo.yaml --methods sft sft_target dpo dpo_base clo --fractions

The methods (the paper's baselines): `sft` = SFT on both languages (the translated pairs' English and target
NLL, clo.sft_sequences [0, 2]); `dpo` = SFT → DPO, DPO started from the same seed's SFT model (which is then its
reference); `clo` = CLO at the config's λ. Named variants: `sft_target` = SFT on the target language only,
`dpo_base` = DPO from the base. --fractions adds CLO trained on that share of the pairs (data.max_examples;
default 0.5: the paper's data-size claim).

Settings (--search, the world's default): one shared learning rate picks the winner, so every method gets its own
settings, chosen the same way before the test is looked at: its grid (SEARCH_GRIDS: the same learning rates for
all; β and length normalisation for DPO and CLO) is trained on --search-seeds, evaluated on the validation
entities, and the rule of clo_fast/evaluate/selection.py picks one setting (CLO's variants take CLO's). The test
runs use other seeds and the test entities only. --search none: the config's settings for every method.

Every difference against SFT gets a 95% interval from a paired bootstrap over entities × seeds (the world asks
four questions per entity; clo_fast.evaluate.bootstrap), with a per-seed t-interval beside it, and the paper's
claims a verdict by the rules written there: (1) CLO beats SFT in the target language, (2) CLO keeps English
(non-inferior to the base; also reported against SFT), (3) CLO with half the pairs matches or beats SFT with all of
them. On the world, (1) and (3) are decided separately on the test entities known in Swahili from pretraining
(positive control) and the English-only ones (transfer); a claim that neither side can do above chance (1/6, or
the model's own answers shuffled across entities: a degenerate answer never clears it) is untestable. The
per-prompt measure of the claims is "correct and in the prompt's language" where the prompts carry answers (the
world), else language fidelity.

Each (method, seed) is one run of clo_fast/train.py: by default one process, with the config's gradient
accumulation times --as-ranks (default 2), so that its global batch, and so its result, equal a 2-rank launch of
the same config (the README's demo: the CLO run of seed 0 is the demo's own run). On GPUs, --launcher
"deepspeed --num_gpus 8" (or "torchrun --nproc_per_node 8") launches each run on several ranks; --as-ranks is then
1 unless given. The seed is optim.seed
(data order and every RNG); the held-out split (data.seed) is the same for every run. The runs share the built
base model, the tokenized-data cache and one reference log-prob cache (train.reference_dir). Then the base and
every trained model are evaluated on the same held-out prompts (clo_fast.evaluate: fidelity, chrF against the
reference answer, reference NLL; with the world's test set also exact-match accuracy and "correct and in the
prompt's language"), and each method's metrics are summarised over its seeds.

Outputs in --out-dir (default: next to train.output_dir, in `compare`): runs/<method>-s<seed>/ (each run's own
folder, with train.log), ref_data/, eval/ (report.*, generations.jsonl), compare.json (per method: per-seed
values, mean and standard deviation of every metric, per-prompt scores, intervals, verdicts), compare.md and
compare.png. Started again with the same settings, it reuses finished runs and resumes an interrupted one from its
last checkpoint.
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
from clo_fast.config import (
    ConfigError,
    RunConfig,
    add_override_argument,
    config_file,
    load_config,
    parse_args_with_overrides,
    validate_output_locations,
)
from clo_fast.constants import LAYER_ABLATION_PATTERNS, WORLD_NAME
from clo_fast.evaluate.comparison_extra import check_evaluation_extras
from clo_fast.logs import add_log_level_argument, get_logger, setup_logging
from clo_fast.training.distributed import LAUNCHER_ENV

log = get_logger("compare")

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
RUN_MARKER = "compare_run.json"  # in each run folder: the settings it was started with, and whether it finished
# fields compare sets for each run; a --set of one of them would be silently replaced, so it is refused
CONTROLLED = (
    "clo.mode",
    "clo.lam",
    "clo.sft_sequences",
    "optim.seed",
    "optim.gradient_accumulation_steps",
    "model.trainable_patterns",
    "train.output_dir",
    "train.reference_dir",
    "train.run_evaluation",
    "train.push_to_hub",
)
DEFAULT_SEEDS = [0, 1, 2, 3, 4]
DEFAULT_SEARCH_SEEDS = [100, 101]  # the settings search's seeds: never the test's (fresh seeds decide the claims)
DEFAULT_METHODS = ["sft", "dpo", "clo"]
WORLD_METHODS = ["sft", "clo"]  # the world's default (with --search, SFT → DPO would need SFT's search first: opt in)
METHOD_CHOICES = ("sft", "sft_target", "dpo", "dpo_base", "clo")
DEFAULT_FRACTIONS = [0.5]
REFERENCE_METHOD = "sft"  # every difference in the table is taken against SFT on both languages (the paper's baseline)
# The settings search, written before any run (clo_fast/evaluate/selection.py: the rule that picks one setting per
# method on the validation entities): every method's grid has the same learning rates; the preference methods (DPO,
# CLO) add β and length normalisation. Epochs stay the config's (2 for the world: SFT answers in Swahili from lr
# 1e-3 on). CLO's variants (half the pairs, other λ, other layers) take CLO's chosen settings.
SEARCH_GRIDS = {
    "full": {"lr": (3e-4, 1e-3, 3e-3), "preference": ((0.1, False), (0.02, False), (0.1, True))},
    "small": {"lr": (1e-3, 3e-3), "preference": ((0.1, False),)},  # the CI-pinned small version
}
SEARCH_FIELDS = ("optim.lr", "clo.beta", "clo.length_normalize")
PREFERENCE_METHODS = ("dpo", "dpo_base", "clo")
# the paper's claims: (id, statement, method, versus, language ("tgt" = the target), part of the test entities
# (None: all), kind (clo_fast/evaluate/bootstrap.py)). Claims 1 and 3 are decided separately on the entities known
# in Swahili from pretraining (positive control: can anything answer them?) and the English-only ones (transfer).
CLAIMS = (
    ("1-known", "CLO beats SFT in the target language (entities known in Swahili)", "clo", "sft", "tgt", "known",
     "beats"),
    ("1-transfer", "CLO beats SFT in the target language (English-only entities: transfer)", "clo", "sft", "tgt",
     "transfer", "beats"),
    ("2", "CLO keeps English (non-inferior to the base)", "clo", "base", "en", None, "keeps"),
    ("2-sft", "CLO keeps English as well as SFT (non-inferior to SFT)", "clo", "sft", "en", None, "keeps"),
    ("3-known", "CLO with half the pairs matches or beats SFT with all of them (entities known in Swahili)",
     "clo-frac0.5", "sft", "tgt", "known", "matches"),
    ("3-transfer", "CLO with half the pairs matches or beats SFT with all of them (English-only entities)",
     "clo-frac0.5", "sft", "tgt", "transfer", "matches"),
)  # fmt: skip


class CompareError(RuntimeError):
    pass


@dataclass(frozen=True)
class Method:
    name: str  # folder and model-label prefix
    title: str  # table column
    short: str  # plot tick
    overrides: tuple[str, ...]
    init_from: str | None = None  # starts from this method's model of the same seed (SFT → DPO)
    # folder (in --out-dir) of the reference log-prob cache, shared by the runs of one base model and one dataset;
    # a run that starts from another run's model keeps its own (in its run folder)
    ref_data: str = "ref_data"
    inherit: str | None = None  # takes this method's chosen settings instead of a search of its own (CLO variants)

    @property
    def grid(self) -> str:
        """The kind of settings grid: "preference" (lr × β × length normalisation) or "lr"."""
        return "preference" if self.name in PREFERENCE_METHODS else "lr"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", required=True, type=config_file, help="run config YAML or a shipped config's name (demo, world)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS, help="optim.seed of each run (default 0-4)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=METHOD_CHOICES,
        help="default: sft dpo clo (SFT on both languages, SFT → DPO, CLO: the paper's); on the world: sft clo",
    )
    p.add_argument(
        "--search",
        choices=(*SEARCH_GRIDS, "none"),
        default=None,
        help="choose each method's settings on the validation entities first (SEARCH_GRIDS; the rule: "
        "clo_fast/evaluate/selection.py); default: full on the world (the only data with a validation split of "
        "entities), none elsewhere (the config's settings for every method)",
    )
    p.add_argument(
        "--search-seeds",
        type=int,
        nargs="+",
        default=DEFAULT_SEARCH_SEEDS,
        help="optim.seed of each search run (default 100 101; never one of --seeds)",
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs="*",
        default=DEFAULT_FRACTIONS,
        help="extra CLO runs on this share of the training pairs (default 0.5; none: --fractions)",
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
    add_log_level_argument(p)
    return parse_args_with_overrides(p, argv)


def plan_methods(
    cfg: RunConfig,
    methods: list[str],
    lams: list[float],
    layers: list[str],
    fractions: list[float] = (),
    n_pairs: int | None = None,
) -> list[Method]:
    """The methods to train, in table order (a method another starts from comes first); a λ or layer set equal
    to CLO's own is not trained twice. n_pairs: the pairs a full run trains on (needed with fractions)."""
    lam = cfg.clo.lam
    sft_seqs = ("clo.sft_sequences=[0, 2]",)
    base = {
        "sft": Method("sft", "SFT (en+tgt)", "SFT", ("clo.mode=sft", *sft_seqs)),
        "sft_target": Method("sft_target", "SFT (tgt only)", "SFT\ntgt", ("clo.mode=sft", "clo.sft_sequences=[2]")),
        "dpo": Method("dpo", "SFT → DPO", "SFT\n→DPO", ("clo.mode=dpo",), init_from="sft"),
        "dpo_base": Method("dpo_base", "DPO from base", "DPO\nbase", ("clo.mode=dpo",)),
        "clo": Method("clo", f"CLO (λ={lam:g})", f"CLO\nλ={lam:g}", ("clo.mode=clo", f"clo.lam={lam!r}")),
    }
    wanted = list(dict.fromkeys(methods))
    if "dpo" in wanted and "sft" not in wanted:
        wanted.insert(wanted.index("dpo"), "sft")  # SFT → DPO needs the SFT runs
    plan = [base[m] for m in wanted]
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ConfigError(f"--fractions: a share of the pairs must be in (0, 1), got {f}")
        if n_pairs is None:
            raise ConfigError("--fractions: the number of training pairs is unknown")
        n = max(1, round(f * n_pairs))
        overrides = ("clo.mode=clo", f"clo.lam={lam!r}", f"data.max_examples={n}")
        name = f"clo-frac{f:g}"
        title, short = f"CLO, {f:g} of pairs", f"CLO\n{f:g} pairs"
        plan.append(Method(name, title, short, overrides, ref_data=f"ref_data-{name}", inherit="clo"))
    for x in lams:
        if not 0.0 <= x <= 1.0:
            raise ConfigError(f"--lams: λ must be in [0, 1], got {x}")
        overrides = ("clo.mode=clo", f"clo.lam={x!r}")
        plan.append(Method(f"clo-lam{x:g}", f"CLO (λ={x:g})", f"CLO\nλ={x:g}", overrides, inherit="clo"))
    if layers and cfg.model.lora is not None:
        raise ConfigError("--layers: model.lora is set; the layer ablation trains full weights (drop model.lora)")
    for layer in layers:
        patterns = list(LAYER_ABLATION_PATTERNS[layer])
        title = {"attention": "CLO, attention only", "mlp": "CLO, MLP only", "all": "CLO, all layers"}[layer]
        overrides = ("clo.mode=clo", f"clo.lam={lam!r}", f"model.trainable_patterns={json.dumps(patterns)}")
        plan.append(Method(f"clo-{layer}", title, title.replace(", ", "\n"), overrides, inherit="clo"))
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


def grid_settings(method: Method, grid: str) -> list[tuple[str, tuple[str, ...]]]:
    """(setting id, overrides) of a method's search grid (SEARCH_GRIDS[grid]), in the grid's order (the order
    that breaks ties)."""
    spec = SEARCH_GRIDS[grid]
    out = []
    for lr in spec["lr"]:
        if method.grid == "lr":
            out.append((f"lr{lr:g}", (f"optim.lr={lr!r}",)))
            continue
        for beta, norm in spec["preference"]:
            sid = f"lr{lr:g}-b{beta:g}" + ("-ln" if norm else "")
            out.append((sid, (f"optim.lr={lr!r}", f"clo.beta={beta!r}", f"clo.length_normalize={str(norm).lower()}")))
    return out


def run_overrides(
    cfg: RunConfig,
    method: Method,
    seed: int,
    run_dir: Path,
    ref_dir: Path,
    as_ranks: int,
    init_model: Path | None = None,
    setting: tuple[str, ...] = (),
) -> list[str]:
    start = [f"model.name_or_path={json.dumps(str(init_model))}"] if init_model is not None else []
    return [
        *method.overrides,
        *setting,
        *start,
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
    setup_logging(args.log_level)
    config = Path(args.config)
    cfg = load_config(config, args.set)  # validated once, before anything runs
    check_arguments(cfg, args)
    check_launcher(args.launcher)
    plan_methods(cfg, args.methods, args.lams, args.layers, args.fractions, n_pairs=1)  # arguments checked first
    check_evaluation_extras(cfg)  # benchmark names and the judge, before minutes of training
    out_dir = Path(args.out_dir or Path(cfg.train.output_dir).parent / "compare")
    validate_output_locations(cfg, lambda name: str(config), {"--out-dir": str(out_dir)})
    out = claim_output_dir(out_dir, "--out-dir", "compare")
    lock = RunLock(out).acquire()  # one compare per folder: a second one would train into the same run folders
    atexit.register(lock.release)
    t0 = time.time()
    n_pairs = count_training_pairs(cfg) if args.fractions else None
    methods = plan_methods(cfg, args.methods, args.lams, args.layers, args.fractions, n_pairs)

    # search: every method's grid on the search seeds, evaluated on the validation entities; one setting chosen
    search = None
    chosen: dict[str, tuple[str, ...]] = {}
    if args.search != "none":
        search = run_search(cfg, config, args, methods, out)
        chosen = {name: tuple(info["chosen_overrides"]) for name, info in search["methods"].items()}
        write_text_atomic(out / "search.json", json.dumps(search, ensure_ascii=False, indent=1))

    runs = train_methods(cfg, config, args, methods, chosen, out)
    evaluated = evaluate_runs(cfg, args, methods, runs, out)
    comp = comparison_record(cfg, config, args, methods, runs, chosen, search, n_pairs, t0, evaluated, out)
    from clo_fast.evaluate.comparison import write_comparison

    files = write_comparison(comp, out)
    print("\n" + (out / files["markdown"]).read_text())  # the result table and where it is: the command's output
    print(f"[compare] {out.resolve()}: " + ", ".join(files.values()))
    return 0


def check_arguments(cfg: RunConfig, args: argparse.Namespace) -> None:
    """The command line against the config, before anything runs; fills in the defaults that depend on the
    config (--methods, --search, --as-ranks)."""
    world = cfg.data.source == WORLD_NAME
    if args.methods is None:
        args.methods = WORLD_METHODS if world else DEFAULT_METHODS
    if args.search is None:
        args.search = "full" if world else "none"
    if args.search != "none" and not world:
        raise ConfigError("--search: only the world has a validation split of held-out entities (use --search none)")
    controlled = CONTROLLED + (("data.max_examples",) if args.fractions else ())
    controlled += SEARCH_FIELDS if args.search != "none" else ()
    controlled += ("model.name_or_path",) if "dpo" in args.methods else ()
    clash = [s for s in args.set if s.split("=", 1)[0].strip() in controlled]
    if clash:
        raise ConfigError(f"--set {clash[0]}: compare sets this field for each run ({', '.join(controlled)})")
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
    if args.search != "none":
        clash = sorted(set(args.seeds) & set(args.search_seeds))
        if clash or len(set(args.search_seeds)) != len(args.search_seeds):
            raise ConfigError(f"--search-seeds: must be distinct and fresh (not in --seeds), got {args.search_seeds}")


def train_methods(
    cfg: RunConfig, config: Path, args, methods: list[Method], chosen: dict[str, tuple[str, ...]], out: Path
) -> dict[str, dict]:
    """Every method × seed, one process each (a method another starts from is trained first), with the setting
    the search chose for it; returns label ("<method>/s<seed>") → train_run's record and its run_dir."""
    runs: dict[str, dict] = {}
    for m in methods:
        setting = chosen.get(m.inherit or m.name, ())
        for seed in args.seeds:
            label = f"{m.name}/s{seed}"
            run_dir = out / "runs" / f"{m.name}-s{seed}"
            init = Path(runs[f"{m.init_from}/s{seed}"]["run_dir"]) / "hf_model" if m.init_from else None
            ref_dir = run_dir / "ref_data" if m.init_from else out / m.ref_data
            overrides = [*args.set, *run_overrides(cfg, m, seed, run_dir, ref_dir, args.as_ranks, init, setting)]
            log.info(f"training {label} → {run_dir}")
            done = train_run(config, overrides, run_dir, args.overwrite, args.launcher)
            runs[label] = {**done, "run_dir": str(run_dir)}
            how = "finished earlier, reused" if runs[label].get("reused") else "trained"
            log.info(f"{label}: {runs[label]['seconds']:.0f} s ({how})")
    return runs


def evaluate_runs(
    cfg: RunConfig, args, methods: list[Method], runs: dict[str, dict], out: Path
) -> tuple[dict, list[dict] | None, list[tuple[str, str]]]:
    """The base and every trained model on the same held-out prompts (out/eval); returns (the report, the
    prompts, the judged pairs)."""
    from clo_fast.evaluate import evaluate_models
    from clo_fast.evaluate.comparison_extra import compare_judge_pairs
    from clo_fast.pretrained import resolve_model_path

    base_path = resolve_model_path(cfg.model.name_or_path, cfg.data.cache_dir, cfg.model.gguf_file)
    specs = [("base", base_path)] + [(label, str(Path(run["run_dir"]) / "hf_model")) for label, run in runs.items()]
    prompts = world_test_prompts(cfg)
    judge_pairs = compare_judge_pairs([m.name for m in methods], args.seeds)  # each method vs SFT, seed by seed
    report = evaluate_models(cfg, specs, prompts=prompts, out_dir=out / "eval", pairs_to_judge=judge_pairs)
    return report, prompts, judge_pairs


def comparison_record(
    cfg: RunConfig,
    config: Path,
    args,
    methods: list[Method],
    runs: dict[str, dict],
    chosen: dict[str, tuple[str, ...]],
    search: dict | None,
    n_pairs: int | None,
    t0: float,
    evaluated: tuple[dict, list[dict] | None, list[tuple[str, str]]],
    out: Path,
) -> dict:
    """compare.json: per-prompt scores, summaries over seeds, intervals against SFT, the claims' verdicts."""
    from clo_fast.evaluate.comparison import (
        aggregate,
        claim_verdicts,
        competence,
        differences,
        prompt_scores,
        prompt_units,
    )
    from clo_fast.evaluate.comparison_extra import aggregate_extra

    report, prompts, judge_pairs = evaluated
    scores = prompt_scores(out / "eval" / "generations.jsonl", prompts)
    units = prompt_units(scores, prompts)
    groups = {m.name: [f"{m.name}/s{s}" for s in args.seeds] for m in methods}
    summary = aggregate(report, {"base": ["base"], **groups}, scores)
    diffs = differences(scores, groups, REFERENCE_METHOD, units) if REFERENCE_METHOD in groups else {}
    gates = competence(scores, {"base": ["base"], **groups}, units)
    extra = aggregate_extra(report, {"base": ["base"], **groups})  # benchmarks, judge win rates
    return {
        "config": str(config),
        "overrides": args.set,
        "target_lang": report["target_lang"],
        "languages": report["languages"],
        "n_prompts": report["n_prompts"],
        "seeds": args.seeds,
        "as_ranks": args.as_ranks,
        "launcher": args.launcher,
        "reference_method": REFERENCE_METHOD,
        "n_pairs": n_pairs,
        "base": summary.pop("base"),
        "extra": extra,
        "judge_versus": "SFT" if judge_pairs else None,
        "methods": {
            m.name: {
                "title": m.title,
                "short": m.short,
                "overrides": list(m.overrides),
                "setting": list(chosen.get(m.inherit or m.name, ())),
                "init_from": m.init_from,
                "metrics": summary[m.name],
                "train_seconds": [runs[f"{m.name}/s{s}"].get("seconds") for s in args.seeds],
            }
            for m in methods
        },
        "differences": diffs,
        "competence": gates,
        "claims": claim_verdicts(scores, {"base": ["base"], **groups}, CLAIMS, report["target_lang"], units, gates),
        "search": search,
        "scores": {**scores, "clusters": units["clusters"], "parts": units["parts"]},
        "seconds": round(time.time() - t0, 1),  # this invocation, reused runs not counted again
        "runs_trained": sum(not r.get("reused") for r in runs.values()),
        "runs_reused": sum(bool(r.get("reused")) for r in runs.values()),
        "versions": versions(),
    }


def run_search(cfg: RunConfig, config: Path, args, methods: list[Method], out: Path) -> dict:
    """Each method's grid (SEARCH_GRIDS[args.search]) trained on the search seeds, evaluated on the validation
    entities, and one setting chosen per method by clo_fast.evaluate.selection's rule. A method that starts from
    another (SFT → DPO) starts from that method's chosen setting of the same seed. Returns the search's record."""
    from clo_fast.data.world import build_entities, validation_items
    from clo_fast.evaluate import evaluate_models
    from clo_fast.evaluate.comparison import prompt_scores
    from clo_fast.evaluate.selection import SELECTION_RULE, choose, setting_value, validation_means
    from clo_fast.pretrained import resolve_model_path

    prompts = validation_items(build_entities())
    root = out / "search"
    record: dict = {
        "grid": args.search,
        "grids": SEARCH_GRIDS[args.search],
        "seeds": args.search_seeds,
        "rule": SELECTION_RULE,
        "split": "valid",
        "methods": {},
    }
    chosen_dirs: dict[str, dict[int, Path]] = {}
    base_path = resolve_model_path(cfg.model.name_or_path, cfg.data.cache_dir)
    for m in methods:
        if m.inherit:
            continue
        settings = grid_settings(m, args.search)
        specs = [("base", base_path)]
        dirs: dict[tuple[str, int], Path] = {}
        for sid, setting in settings:
            for seed in args.search_seeds:
                run_dir = root / "runs" / f"{m.name}-{sid}-s{seed}"
                init = chosen_dirs[m.init_from][seed] / "hf_model" if m.init_from else None
                ref_dir = run_dir / "ref_data" if m.init_from else out / m.ref_data  # shared with the test runs
                overrides = [*args.set, *run_overrides(cfg, m, seed, run_dir, ref_dir, args.as_ranks, init, setting)]
                log.info(f"search: training {m.name} {sid} s{seed} → {run_dir}")
                done = train_run(config, overrides, run_dir, args.overwrite, args.launcher)
                how = "finished earlier, reused" if done.get("reused") else "trained"
                log.info(f"search: {m.name} {sid} s{seed}: {done['seconds']:.0f} s ({how})")
                dirs[(sid, seed)] = run_dir
                specs.append((f"{m.name}@{sid}/s{seed}", str(run_dir / "hf_model")))
        evaluate_models(cfg, specs, prompts=prompts, out_dir=root / "eval" / m.name)
        scores = prompt_scores(root / "eval" / m.name / "generations.jsonl", prompts)
        rows = []
        for sid, setting in settings:
            per_seed = [validation_means(scores, f"{m.name}@{sid}/s{seed}") for seed in args.search_seeds]
            rows.append(
                {
                    "id": sid,
                    "overrides": list(setting),
                    "per_seed": per_seed,
                    "criterion": setting_value(per_seed, cfg.data.target_lang),
                }
            )
        best = choose([r["criterion"] for r in rows])
        chosen_dirs[m.name] = {seed: dirs[(rows[best]["id"], seed)] for seed in args.search_seeds}
        record["methods"][m.name] = {
            "title": m.title,
            "settings": rows,
            "chosen": rows[best]["id"],
            "chosen_overrides": rows[best]["overrides"],
            "base": validation_means(scores, "base"),
        }
        log.info(f"search: {m.name} chose {rows[best]['id']} ({' '.join(rows[best]['overrides'])}): "
                 f"criterion {rows[best]['criterion']:.3f} on validation")  # fmt: skip
    return record


def count_training_pairs(cfg: RunConfig) -> int:
    """The pairs a run of this config trains on (the text dataset's train split, built here if needed)."""
    from clo_fast.data import load_or_build_text_dataset

    dsd, _ = load_or_build_text_dataset(cfg.data)
    return len(dsd["train"])


def world_test_prompts(cfg: RunConfig) -> list[dict] | None:
    """The world's test questions (with their answers) when the config trains on the world; else None: the
    held-out split of the config's data, as clo_fast.evaluate takes it."""
    if cfg.data.source != WORLD_NAME:
        return None
    from clo_fast.data.world import build_entities, test_items

    return test_items(build_entities())


def cli(argv=None) -> int:
    """main() with its errors as one line and exit status 2 (`python -m clo_fast.compare`, `clo-fast compare`)."""
    try:
        return main(argv)
    except (ConfigError, OutputDirError, CompareError) as e:
        log.error(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(cli())
