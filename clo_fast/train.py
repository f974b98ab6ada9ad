"""CLO training under DeepSpeed ZeRO-3 on the fused LM head.

    deepspeed --num_gpus 8 clo_fast/train.py --config configs/llama3_8b_sw.yaml
    deepspeed --num_gpus 2 clo_fast/train.py --config configs/demo.yaml              # CPU: 2 gloo ranks
    deepspeed ... clo_fast/train.py --config <run>.yaml --resume [TAG]               # continue (latest by default)
    deepspeed ... clo_fast/train.py --config <run>.yaml --set optim.max_steps=20 --set clo.beta=0.2

Read top to bottom: config → data → tokenizer → tokenized data → model/engine → reference log-probs
(one no-grad pass, stored with the data as a `ref_logps` column, reused on resume) → loop with gradient
accumulation → checkpoints → HF export → optional evaluation.

Averaging. One optimizer step sees G micro-batches on each of W ranks. `clo_loss` gets the step's global
denominators divided by G·W (see its docstring): DeepSpeed's backward divides by G and its gradient
all-reduce averages over W, so the update is the gradient of the token-mean NLL and the triple-mean DPO
loss over the whole global batch, however tokens are spread over micro-batches and ranks.

Data order. A seeded permutation per epoch; optimizer step s of epoch e takes the next G·W·B examples of
that permutation, micro-batch m of rank r being the (m·W + r)-th slice. The position is the global step,
saved in every checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have.

Checkpoints are written to `<output_dir>/checkpoints/.tmp-<tag>` and renamed to `<tag>` by rank 0 only
after every rank has finished writing; the `latest` file is replaced (atomically) after that. A crash
mid-write leaves only a `.tmp-*` directory, which `--resume` ignores and the next save removes.
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts clo_fast/ itself at sys.path[0]: drop it so nothing in it can shadow a
# top-level module, and make the repository importable for checkouts that were not pip-installed.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if os.path.dirname(_HERE) not in sys.path:
    sys.path.append(os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated, once per step
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

from clo_fast.config import ConfigError, RunConfig, load_config, to_dict  # noqa: E402

REPO_ROOT = Path(_HERE).parent
MODE_LAMBDA = {"sft": 1.0, "dpo": 0.0}  # clo mode uses cfg.clo.lam


# ============================================================================ command line, config
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (see configs/demo.yaml for every field)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint in <output_dir>/checkpoints: a tag, or 'latest' (default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set optim.max_steps=10 (value parsed as YAML)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the launcher
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_file(path: str, config_path: Path) -> Path:
    """A path from the config: as given (cwd), else next to the config file, else in the repository."""
    for cand in (Path(path), config_path.parent / path, REPO_ROOT / path):
        if cand.is_file():
            return cand
    raise ConfigError(f"{config_path}: train.deepspeed_config: file not found: {path}")


def build_ds_config(cfg: RunConfig, config_path: Path, world: int) -> dict:
    """The ZeRO-3 JSON, with batch sizes, precision and clipping filled from the run config."""
    src = resolve_file(cfg.train.deepspeed_config, config_path)
    try:
        ds = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{src}: not valid JSON: {e}") from None
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 3) != 3:
        raise ConfigError(f"{src}: zero_optimization.stage: the trainer needs ZeRO stage 3, got {zero.get('stage')}")
    zero["stage"] = 3
    zero["stage3_gather_16bit_weights_on_model_save"] = True  # the HF export needs gathered weights
    o = cfg.optim
    filled = {
        "train_micro_batch_size_per_gpu": o.micro_batch_examples,
        "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "train_batch_size": o.micro_batch_examples * o.gradient_accumulation_steps * world,
        "gradient_clipping": o.max_grad_norm,
    }
    for key, value in filled.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{src}: {key}: set from the run config (optim.*) — remove it or use \"auto\" "
                              f"(JSON has {ds[key]}, run config gives {value})")
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{src}: {key}: the trainer builds the optimizer and LR schedule from optim.*; remove it")
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.train.precision == "fp16"}
    ds["zero_allow_untested_optimizer"] = True  # torch.optim.AdamW
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# =================================================================================== small helpers
def log0(*args) -> None:
    if RANK == 0:
        print("[train]", *args, flush=True)


def barrier() -> None:
    if WORLD > 1:
        torch.distributed.barrier()


def rank0_first(fn):
    """Run fn on rank 0, then on the other ranks (they find rank 0's on-disk caches)."""
    if RANK == 0:
        out = fn()
        barrier()
    else:
        barrier()
        out = fn()
    return out


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.random.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process peak RSS)


def maybe_crash(point: str, step: int) -> None:
    """Test hook: CLO_FAST_TEST_CRASH=<point>:<step> kills this process (SIGKILL) there."""
    spec = os.environ.get("CLO_FAST_TEST_CRASH", "")
    if spec == f"{point}:{step}":
        print(f"[train] rank {RANK}: test crash at {spec}", flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR factor for the update after `step` completed updates: linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


class StepSampler:
    """Seeded, resumable batch order: the examples of micro-batch m, rank r, optimizer step s."""

    def __init__(self, n: int, micro: int, gas: int, world: int, seed: int):
        self.n, self.micro, self.gas, self.world, self.seed = n, micro, gas, world, seed
        self.global_batch = micro * gas * world
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int, m: int, rank: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        start = k * self.global_batch + (m * self.world + rank) * self.micro
        return self._perm[start:start + self.micro]


# ========================================================================== forward on a batch
def h2d(t: torch.Tensor, device) -> torch.Tensor:
    """Host → device without a stream sync: a copy from pageable memory would synchronize, pinned does not."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(batch: dict, device) -> dict:
    return {k: h2d(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def policy_logps(engine, batch: dict, rows: list[int] | None) -> torch.Tensor:
    """[B,4] per-sequence log-prob sums; with `rows` (sft mode) only those sequences are run, others are 0."""
    B = batch["response_tokens"].shape[0]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if rows is None:
        return engine(ids, mask, labels).view(B, 4)
    sel = h2d((torch.arange(B)[:, None] * 4 + torch.tensor(rows)).reshape(-1), ids.device)
    part = engine(ids[sel], mask[sel], labels[sel]).view(B, len(rows))
    full = part.new_zeros(B, 4)
    full[:, rows] = part
    return full


@torch.no_grad()
def score_dataset(engine, ds, collate, micro: int, device, rows=None, desc="scoring") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob sums [N,4] and response-token counts [N,4] of a whole dataset, on every rank.

    Ranks take interleaved examples; every rank runs the same number of forwards (ZeRO-3 gathers
    parameters collectively), padding with repeats that are dropped afterwards."""
    from tqdm.auto import tqdm

    n = len(ds)
    per_rank = math.ceil(n / WORLD)
    n_batches = math.ceil(per_rank / micro)
    mine = [RANK + WORLD * i for i in range(per_rank)]
    logps = torch.zeros(n_batches * micro, 4, device=device)
    counts = torch.zeros(n_batches * micro, 4, device=device)
    was_training = engine.module.training
    engine.eval()
    for b in tqdm(range(n_batches), desc=desc, disable=RANK != 0, leave=False):
        idx = mine[b * micro:(b + 1) * micro]
        idx = [i if i < n else 0 for i in idx] + [0] * (micro - len(idx))
        batch = to_device(collate([ds[i] for i in idx]), device)
        logps[b * micro:(b + 1) * micro] = policy_logps(engine, batch, rows).float()
        counts[b * micro:(b + 1) * micro] = batch["response_tokens"].float()
    engine.train(was_training)
    if WORLD > 1:
        parts_l = [torch.empty_like(logps) for _ in range(WORLD)]
        parts_c = [torch.empty_like(counts) for _ in range(WORLD)]
        torch.distributed.all_gather(parts_l, logps)
        torch.distributed.all_gather(parts_c, counts)
    else:
        parts_l, parts_c = [logps], [counts]
    out_l, out_c = torch.zeros(n, 4, device=device), torch.zeros(n, 4, device=device)
    for r in range(WORLD):
        ids = torch.arange(r, n, WORLD, device=device)
        out_l[ids] = parts_l[r][: len(ids)]
        out_c[ids] = parts_c[r][: len(ids)]
    return out_l, out_c


def with_reference_logps(ds, split: str, engine, collate, cfg: RunConfig, model_path: str, device):
    """The dataset with a `ref_logps` column: loaded from <output_dir>/ref_data/<split> when it was computed
    for the same model, data and precision (every resume), else one no-grad pass with the engine (which at
    this point holds the starting weights — the reference model), saved there by rank 0."""
    import datasets

    key = {"model": model_path, "data": getattr(ds, "_fingerprint", None), "rows": len(ds),
           "precision": cfg.train.precision, "head_impl": cfg.train.head_impl}
    where = Path(cfg.train.output_dir) / "ref_data" / split
    meta = where / "clo_ref_meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == key:
        log0(f"reference log-probs ({split}): reusing {where}")
        return datasets.load_from_disk(str(where))
    t0 = time.time()
    ref, _ = score_dataset(engine, ds, collate, cfg.optim.micro_batch_examples, device, desc=f"reference ({split})")
    ds = ds.add_column("ref_logps", ref.cpu().tolist())
    if RANK == 0:
        tmp = where.with_name(f".tmp-{split}")
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(str(tmp))
        (tmp / "clo_ref_meta.json").write_text(json.dumps(key))
        shutil.rmtree(where, ignore_errors=True)
        os.replace(tmp, where)
    barrier()
    log0(f"reference log-probs ({split}): {len(ds)} examples in {time.time() - t0:.1f}s → {where}")
    return ds


# ================================================================================= checkpoints
def ckpt_root(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def save_checkpoint(engine, cfg: RunConfig, step: int, extra: dict) -> None:
    """DeepSpeed checkpoint + per-rank RNG, published atomically (tmp dir → rename → `latest`)."""
    root, tag = ckpt_root(cfg), f"step_{step:08d}"
    tmp = f".tmp-{tag}"
    if RANK == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp, client_state={"clo_step": step}, save_latest=False)
    torch.save(rng_state(), root / tmp / f"rng_state_rank{RANK}.pt")
    barrier()  # every rank has written its shard
    maybe_crash("in_save", step)
    if RANK == 0:
        (root / tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": WORLD, **extra}, indent=1))
        shutil.rmtree(root / tag, ignore_errors=True)
        os.rename(root / tmp, root / tag)
        with open(root / "latest.tmp", "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(root / "latest.tmp", root / "latest")
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - max(1, cfg.train.save_total_limit))]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    log0(f"checkpoint {root / tag}")


def load_checkpoint(engine, cfg: RunConfig, which: str) -> int:
    root = ckpt_root(cfg)
    if which == "latest":
        if not (root / "latest").is_file():
            raise ConfigError(f"--resume: no complete checkpoint in {root} (no 'latest' file)")
        which = (root / "latest").read_text().strip()
    if which.startswith(".tmp-") or not (root / which / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {which}: not a complete checkpoint in {root}")
    _, client = engine.load_checkpoint(str(root), tag=which, load_optimizer_states=True, load_lr_scheduler_states=True)
    state = json.loads((root / which / "trainer_state.json").read_text())
    rng = root / which / f"rng_state_rank{RANK}.pt"
    if state.get("world_size") != WORLD:
        log0(f"warning: checkpoint was written by {state.get('world_size')} ranks, now {WORLD}: "
             "the data order from here on differs from the original run")
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    log0(f"resumed from {root / which} at step {state['step']}")
    return int(state["step"])


def export_hf(engine, cfg: RunConfig, tokenizer, summary: dict) -> Path:
    """Gathered 16-bit weights + config + tokenizer, loadable with AutoModelForCausalLM.from_pretrained."""
    out = Path(cfg.train.output_dir) / "hf_model"
    tmp = out.with_name(".tmp-hf_model")
    if RANK == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_16bit_model(str(tmp), "pytorch_model.bin")  # collective: every rank
    if RANK == 0:
        from safetensors.torch import save_file

        module = engine.module
        sd = torch.load(tmp / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        if getattr(module.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del sd
        (tmp / "pytorch_model.bin").unlink()
        config = module.config
        config.use_cache = True
        config.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.train.precision]
        config.save_pretrained(tmp)
        if module.generation_config is not None:
            module.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "clo_training_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    barrier()
    return out


# ======================================================================================= metrics
class MetricsSink:
    """Rank 0: JSONL (<output_dir>/metrics.jsonl) and TensorBoard (<output_dir>/tensorboard)."""

    def __init__(self, cfg: RunConfig, start_step: int):
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.tb = None
        if RANK != 0:
            return
        if start_step > 0 and self.path.is_file():  # drop what a crashed run logged after its last checkpoint
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= start_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif start_step == 0:
            self.path.write_text("")
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.train.output_dir) / "tensorboard"), purge_step=start_step or None)

    def write(self, step: int, metrics: dict) -> None:
        if RANK != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of device scalars: one all-reduce and one host sync (logging intervals only)."""
    keys = sorted(values)
    vec = torch.stack([values[k].float() for k in keys])
    if WORLD > 1:
        torch.distributed.all_reduce(vec)
        vec /= WORLD
    return dict(zip(keys, vec.tolist()))


def evaluate_loss(engine, ds, collate, cfg: RunConfig, device, rows, beta, lam, sft_seq) -> dict[str, float]:
    """CLO loss and metrics over the whole held-out split (exact: one clo_loss call on all its sequences)."""
    from clo_fast.loss import clo_loss

    logps, counts = score_dataset(engine, ds, collate, cfg.optim.micro_batch_examples, device, rows, desc="eval")
    ref = None if "ref_logps" not in ds.column_names else torch.tensor(ds["ref_logps"], device=device, dtype=torch.float32)
    _, m = clo_loss(logps, ref, counts, beta, lam, sft_sequences=sft_seq, validate=False)
    keep = m if rows is None else {k: v for k, v in m.items() if k in ("loss", "nll")}
    return {f"eval/{k}": float(v) for k, v in keep.items()}


# ========================================================================================== main
RANK, WORLD = 0, 1


def main(argv=None) -> int:
    global RANK, WORLD
    args = parse_args(argv)
    config_path = Path(args.config)
    # ---- config: validated before anything heavy is imported, so a bad field fails in a second
    cfg = load_config(config_path, parse_overrides(args.set))
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = build_ds_config(cfg, config_path, world_env)
    o, c, t = cfg.optim, cfg.clo, cfg.train
    lam = MODE_LAMBDA.get(c.mode, c.lam)
    sft_seq = tuple(c.sft_sequences)
    use_ref = not (c.reference_free or c.mode == "sft")
    rows = sorted(sft_seq) if c.mode == "sft" else None  # sft: only the NLL sequences are run

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from clo_fast.data import build_text_dataset, collate_clo, tokenize_dataset
    from clo_fast.loss import clo_loss
    from clo_fast.model import DTYPES, load_policy, load_tokenizer, resolve_model_path

    deepspeed.init_distributed()
    RANK, WORLD = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    device = torch.device(accel.device_name(local_rank)) if accel.device_name() != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if t.head_impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"{config_path}: train.head_impl: triton needs a CUDA device (or TRITON_INTERPRET=1); "
                          "use auto or torch on CPU")
    set_seed(o.seed)
    out_dir = Path(t.output_dir)
    if RANK == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    log0(f"{WORLD} rank(s) on {device.type} ({torch.distributed.get_backend()}); mode {c.mode}, λ={lam}, β={c.beta}")

    # ---- data: text-level dataset (rank 0 builds/caches it first), tokenizer, tokenized splits
    texts = rank0_first(lambda: build_text_dataset(cfg.data))[0]
    model_path = rank0_first(lambda: resolve_model_path(cfg.model.name_or_path, cfg.data.cache_dir))
    tokenizer = load_tokenizer(model_path)
    train_ds = rank0_first(lambda: tokenize_dataset(texts["train"], tokenizer, cfg.data))
    eval_ds = rank0_first(lambda: tokenize_dataset(texts["eval"], tokenizer, cfg.data)) if len(texts["eval"]) else None

    def collate(examples):
        return collate_clo(examples, tokenizer.pad_token_id, pad_to_multiple_of=t.pad_to_multiple_of)

    sampler = StepSampler(len(train_ds), o.micro_batch_examples, o.gradient_accumulation_steps, WORLD, o.seed)
    if sampler.steps_per_epoch == 0:
        raise ConfigError(f"{config_path}: optim.micro_batch_examples: a global batch of {sampler.global_batch} examples "
                          f"(micro_batch_examples × gradient_accumulation_steps × {WORLD} ranks) exceeds the "
                          f"{len(train_ds)} training examples")
    total_steps = o.max_steps or o.epochs * sampler.steps_per_epoch
    log0(f"data: {len(train_ds)} train / {len(eval_ds) if eval_ds else 0} eval examples; global batch "
         f"{sampler.global_batch} examples; {sampler.steps_per_epoch} steps/epoch; {total_steps} steps")

    # ---- model: ZeRO-3 partitioned while loading, frozen but for trainable_patterns, fused head
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
    assert DTYPES[cfg.model.dtype] == dtype  # validated in RunConfig
    policy, info, _, _keepalive = load_policy(cfg.model, dtype=dtype, ds_config=ds_config, head_impl=t.head_impl,
                                              cache_dir=cfg.data.cache_dir)
    log0(f"model {model_path}: {info.trainable / 1e6:.2f}M of {info.total / 1e6:.2f}M parameters train "
         f"({len(info.names)} tensors, e.g. {info.names[0]})")
    decay, no_decay = [], []
    for p in policy.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, o.warmup_steps, o.schedule, o.min_lr_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)

    # ---- reference log-probs: one no-grad pass with the starting weights, stored with the data
    if use_ref:
        train_ds = with_reference_logps(train_ds, "train", engine, collate, cfg, model_path, device)
        if eval_ds is not None:
            eval_ds = with_reference_logps(eval_ds, "eval", engine, collate, cfg, model_path, device)

    # ---- resume: weights, optimizer, LR schedule, step (= data position), RNG
    step = load_checkpoint(engine, cfg, args.resume) if args.resume else 0
    sink = MetricsSink(cfg, step)
    if eval_ds is not None and t.eval_steps > 0 and step == 0:
        m = evaluate_loss(engine, eval_ds, collate, cfg, device, rows, c.beta, lam, sft_seq)
        sink.write(0, m)
        log0("eval @0: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items() if k in ("eval/loss", "eval/rewards/accuracies")))

    # ---- the loop
    from tqdm.auto import tqdm

    gas, G, W = o.gradient_accumulation_steps, o.gradient_accumulation_steps, WORLD
    cl_den = 2.0 * o.micro_batch_examples  # = (2 triples × global examples) / (G·W)
    bar = tqdm(total=total_steps, initial=step, disable=RANK != 0, desc="train", dynamic_ncols=True)
    acc: dict[str, torch.Tensor] = {}
    tokens_local, t_last, steps_since = 0, time.perf_counter(), 0
    last_metrics: dict = {}
    engine.train()
    while step < total_steps:
        lr_now = float(engine.get_lr()[0])  # the LR this update uses (host float, no sync)
        micro = [collate([train_ds[i] for i in sampler.indices(step, m, RANK)]) for m in range(gas)]
        sft_local = sum(int(b["response_tokens"][:, list(sft_seq)].sum()) for b in micro)  # host tensors: no sync
        tokens_local += sum(int(b["attention_mask"].sum()) for b in micro)
        sft_den = h2d(torch.tensor(float(sft_local)), device)
        if WORLD > 1:
            torch.distributed.all_reduce(sft_den)
        sft_den = sft_den / (G * W)
        for batch in micro:
            batch = to_device(batch, device)
            logps = policy_logps(engine, batch, rows)
            ref = batch.get("ref_logps") if use_ref else None
            loss, metrics = clo_loss(logps, ref, batch["response_tokens"], c.beta, lam, sft_sequences=sft_seq,
                                     sft_denominator=sft_den, cl_denominator=cl_den, validate=False)
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the update at the accumulation boundary
            if rows is not None:
                metrics = {k: metrics[k] for k in ("loss", "nll")}
            for k, v in metrics.items():
                acc[k] = acc[k] + v / gas if k in acc else v / gas
        step += 1
        steps_since += 1
        bar.update(1)
        maybe_crash("after_step", step)

        if step % t.logging_steps == 0 or step == total_steps:
            acc["tokens"] = torch.tensor(float(tokens_local * WORLD), device=device)
            logged = reduce_mean({k: v / (1 if k == "tokens" else steps_since) for k, v in acc.items()})
            now = time.perf_counter()
            gn = engine.get_global_grad_norm()
            logged["grad_norm"] = float(gn) if gn is not None else float("nan")
            logged["learning_rate"] = lr_now
            logged["tokens/s"] = logged.pop("tokens") / (now - t_last)
            logged["peak_memory_mib"] = peak_memory_mib()
            logged["epoch"] = step / sampler.steps_per_epoch
            sink.write(step, logged)
            bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged.get('rewards/accuracies', float('nan')):.2f}",
                            lr=f"{logged['learning_rate']:.2e}")
            last_metrics.update(logged)
            acc, tokens_local, t_last, steps_since = {}, 0, time.perf_counter(), 0

        if eval_ds is not None and ((t.eval_steps and step % t.eval_steps == 0) or step == total_steps):
            m = evaluate_loss(engine, eval_ds, collate, cfg, device, rows, c.beta, lam, sft_seq)
            sink.write(step, m)
            last_metrics.update(m)
            t_last = time.perf_counter()  # eval time is not training throughput
        if (t.save_steps and step % t.save_steps == 0) or step == total_steps:
            save_checkpoint(engine, cfg, step, {"metrics": last_metrics})
            t_last = time.perf_counter()
    bar.close()
    sink.close()

    # ---- export, report, optional evaluation
    summary = {"steps": step, "world_size": WORLD, "final_metrics": last_metrics, "config": to_dict(cfg),
               "base_model": model_path}
    export = export_hf(engine, cfg, tokenizer, summary) if t.export_hf else None
    if RANK == 0:
        keys = ["loss", "nll", "cl_loss", "rewards/accuracies", "rewards/margins", "eval/loss",
                "eval/rewards/accuracies", "tokens/s", "peak_memory_mib"]
        print("[train] final metrics: " + ", ".join(f"{k}={last_metrics[k]:.4g}" for k in keys if k in last_metrics))
        print(f"[train] metrics log: {out_dir / 'metrics.jsonl'}; checkpoints: {ckpt_root(cfg)}")
        if export is not None:
            print(f"[train] HF model exported to {export.resolve()}")
        (out_dir / "final_metrics.json").write_text(json.dumps(last_metrics, indent=1))
    barrier()
    torch.distributed.destroy_process_group()
    if t.run_evaluation and export is not None and RANK == 0:  # after the ranks part: no collective timeout
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        del engine, optimizer, scheduler, policy, _keepalive
        unset_hf_deepspeed_config()  # plain (non-ZeRO) from_pretrained for the evaluation models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        from clo_fast.evaluate import evaluate_models

        report = evaluate_models(cfg, [("base", model_path), ("trained", str(export))])
        print(f"[train] evaluation report: {Path(cfg.eval.output_dir).resolve()} "
              f"({len(report.get('models', {}))} models)\n")
        print(Path(report["files"]["markdown"]).read_text())  # the before/after table
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"[train] config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
