"""Where metrics go: rank 0 writes <output_dir>/metrics.jsonl and TensorBoard; all ranks average first."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from clo_fast.config import RunConfig
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


class MetricsSink:
    """Rank 0: JSONL (<output_dir>/metrics.jsonl) and TensorBoard (<output_dir>/tensorboard).

    On resume, lines a crashed run logged after its last checkpoint are dropped, so the log matches an
    uninterrupted run."""

    def __init__(self, cfg: RunConfig, start_step: int):
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.tb = None
        if rank() != 0:
            return
        if start_step > 0 and self.path.is_file():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif start_step == 0:
            self.path.write_text("")
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.train.output_dir) / "tensorboard"), purge_step=start_step or None)

    def write(self, step: int, metrics: dict) -> None:
        if rank() != 0:
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
