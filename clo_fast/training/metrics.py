"""Where metrics go: rank 0 writes to each logger of train.report_to (JSONL, TensorBoard, W&B, MLflow, each
through its own library); all ranks average first."""

from __future__ import annotations

import html
import json
import math
import os
import time
import uuid
from pathlib import Path

import torch

from clo_fast.config import RunConfig, flatten_config, to_dict
from clo_fast.training.distributed import peak_memory_mib, rank, world_size

FINAL_METRIC_KEYS = (
    "loss",
    "nll",
    "cl_loss",
    "rewards/accuracies",
    "rewards/margins",
    "eval/loss",
    "eval/rewards/accuracies",
    "tokens/s",
    "peak_memory_mib",
)


class JsonlLogger:
    """<output_dir>/metrics.jsonl, one record per write. On resume, lines a crashed run logged after its last
    checkpoint are dropped, so the log matches an uninterrupted run."""

    def __init__(self, cfg: RunConfig, start_step: int):
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        if start_step > 0 and self.path.is_file():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif start_step == 0:
            self.path.write_text("")

    def log(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """<output_dir>/tensorboard (torch.utils.tensorboard); scalars, and text for the sample generations."""

    def __init__(self, cfg: RunConfig, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(cfg.train.output_dir) / "tensorboard"), purge_step=start_step or None)

    def log(self, step: int, metrics: dict) -> None:
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(k, v, step)
        for k, v in _texts(metrics).items():
            self.writer.add_text(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Weights & Biases: one run per output_dir, resumed with it (the run id is kept in <output_dir>/wandb_run_id).
    W&B's own environment applies: WANDB_DIR (else the output_dir) holds its wandb/ folder; WANDB_MODE=offline
    writes there without a network."""

    def __init__(self, cfg: RunConfig, start_step: int):
        import wandb

        out = Path(cfg.train.output_dir)
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.train.project,
            name=cfg.train.run_name or out.name,
            id=run_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(out),  # None: wandb reads WANDB_DIR itself
            config=to_dict(cfg),
        )

    def log(self, step: int, metrics: dict) -> None:
        import wandb

        record = dict(_scalars(metrics))
        for k, v in _texts(metrics).items():
            record[k] = wandb.Html(f"<pre>{html.escape(v)}</pre>")
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """MLflow: the experiment train.project, a run named like the output_dir; MLFLOW_TRACKING_URI applies,
    else a file store under <output_dir>/mlruns. Config fields are logged as params (dotted names)."""

    def __init__(self, cfg: RunConfig, start_step: int):
        import mlflow

        out = Path(cfg.train.output_dir)
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # no server or database configured: a file store next to the run (MLflow 3 asks for an opt-in to it)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(cfg.train.project)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=cfg.train.run_name or out.name)
        params = flatten_config(to_dict(cfg))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, step: int, metrics: dict) -> None:
        scalars = {_mlflow_name(k): v for k, v in _scalars(metrics).items() if math.isfinite(v)}
        if scalars:
            self.mlflow.log_metrics(scalars, step=step)
        for k, v in _texts(metrics).items():
            self.mlflow.log_text(v, f"samples/step_{step:07d}_{_mlflow_name(k).replace('/', '_')}.txt")

    def close(self) -> None:
        self.mlflow.end_run()


# one logger per name of constants.REPORTERS (the names train.report_to is validated against)
LOGGERS = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _texts(metrics: dict) -> dict[str, str]:
    return {k: v for k, v in metrics.items() if isinstance(v, str)}


def _mlflow_name(key: str) -> str:
    """MLflow allows letters, digits, _ - . space / in names; anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


class MetricsSink:
    """Rank 0 writes every record to each logger of train.report_to; other ranks write nothing.

    A record is {name: number} (scalars) plus optional {name: text} entries (sample generations): JSONL keeps
    both, TensorBoard / W&B / MLflow log the numbers as metrics and the texts as text."""

    def __init__(self, cfg: RunConfig, start_step: int):
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.loggers = []
        if rank() != 0:
            return
        self.loggers = [LOGGERS[name](cfg, start_step) for name in cfg.train.report_to]

    def write(self, step: int, metrics: dict) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of device scalars: one all-reduce and one host sync (logging intervals only)."""
    keys = sorted(values)
    vec = torch.stack([values[k].float() for k in keys])
    if world_size() > 1:
        torch.distributed.all_reduce(vec)
        vec /= world_size()
    return dict(zip(keys, vec.tolist(), strict=True))


def format_metrics(metrics: dict, keys=FINAL_METRIC_KEYS) -> str:
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


class StepLog:
    """What the loop logs every `train.logging_steps`: the mean of each step metric since the last line, over
    steps and ranks, plus grad norm, LR, tokens/s (eval and checkpoint time excluded), peak memory, epoch."""

    def __init__(self, sink: MetricsSink, device):
        self.sink, self.device = sink, device
        self.totals: dict[str, torch.Tensor] = {}  # device scalars: no host sync until a line is written
        self.tokens, self.steps = 0, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_start = time.perf_counter()

    def add(self, step_metrics: dict[str, torch.Tensor], tokens: int) -> None:
        for k, v in step_metrics.items():
            self.totals[k] = self.totals[k] + v if k in self.totals else v
        self.tokens += tokens
        self.steps += 1

    def write(self, step: int, *, grad_norm, learning_rate: float, epoch: float) -> dict:
        means = {k: v / self.steps for k, v in self.totals.items()}
        tokens = torch.tensor(float(self.tokens * world_size()), device=self.device)
        logged = reduce_mean({**means, "tokens": tokens})
        logged["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        logged["learning_rate"] = learning_rate
        logged["tokens/s"] = logged.pop("tokens") / (time.perf_counter() - self.t_start)
        logged["peak_memory_mib"] = peak_memory_mib()
        logged["epoch"] = epoch
        self.sink.write(step, logged)
        self.totals, self.tokens, self.steps = {}, 0, 0
        self.restart_clock()
        return logged


class EnglishGuard:
    """Warns, at the eval step it happens, when English degrades: the held-out English answers' NLL/token
    (`eval/en/nll_per_token`) more than `threshold` (a fraction) above the reference model's, or above the first
    evaluation's when no reference is cached. Warns on the first crossing and again each time it worsens by
    another threshold, so a run that keeps eroding English keeps saying so; adds `eval/en/nll_increase`."""

    def __init__(self, threshold: float | None, lr: float, log):
        self.threshold, self.lr, self.log = threshold, lr, log
        self.baseline: float | None = None
        self.warned_at: float | None = None

    def observe(self, step: int, metrics: dict) -> None:
        now = metrics.get("eval/en/nll_per_token")
        if now is None:
            return
        if self.baseline is None:
            self.baseline = metrics.get("eval/en/ref_nll_per_token", now)
        increase = now / self.baseline - 1.0 if self.baseline > 0 else 0.0
        metrics["eval/en/nll_increase"] = increase
        if self.threshold is None or increase <= self.threshold:
            return
        if self.warned_at is not None and increase < self.warned_at + self.threshold:
            return
        self.warned_at = increase
        self.log(
            f"warning: step {step}: English is degrading: the held-out English answers' NLL/token rose from "
            f"{self.baseline:.3f} (reference) to {now:.3f} (+{100 * increase:.1f}%, past train.english_nll_warn = "
            f"{100 * self.threshold:.0f}%). CLO trains no English NLL term, so this is most likely the learning "
            f"rate (optim.lr = {self.lr:g}) being too high for this model: lower it (configs/smollm2_sw.yaml's sweep), "
            "or raise clo.lam / add English to clo.sft_sequences"
        )
