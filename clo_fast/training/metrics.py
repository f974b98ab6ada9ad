"""Where metrics go: rank 0 writes <output_dir>/metrics.jsonl and TensorBoard; all ranks average first."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clo_fast.config import RunConfig
from clo_fast.training.distributed import rank, world_size

FINAL_METRIC_KEYS = (
    "loss", "nll", "cl_loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies",
    "tokens/s", "peak_memory_mib",
)  # fmt: skip


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
