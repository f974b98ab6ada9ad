"""Which examples each micro-batch takes: a seeded permutation per epoch, resumable from the step number.

Optimizer step s of epoch e takes the next G·W·B examples of that epoch's permutation (G micro-batches
per step, W ranks, B examples per micro-batch), micro-batch m of rank r being the (m·W + r)-th slice. The
position is the global step, saved in every checkpoint, so a resumed run sees exactly the batches the
uninterrupted run would have, and 1 rank × 2G accumulation sees the same examples as 2 ranks × G.
"""

from __future__ import annotations

import torch

from clo_fast.config import ConfigError, RunConfig


class StepSampler:
    """Seeded, resumable batch order: the examples of micro-batch m, rank r, optimizer step s."""

    def __init__(self, n: int, micro: int, accumulation_steps: int, world: int, seed: int):
        self.n, self.micro, self.accumulation_steps, self.world, self.seed = n, micro, accumulation_steps, world, seed
        self.global_batch = micro * accumulation_steps * world
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def global_indices(self, step: int) -> list[int]:
        """Every example of optimizer step `step`, micro-step by micro-step, rank by rank: the global batch each
        rank groups alike (MicroBatcher.step_batches)."""
        micro_steps, ranks = range(self.accumulation_steps), range(self.world)
        return [i for m in micro_steps for r in ranks for i in self.indices(step, m, r)]

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        start = k * self.global_batch + (micro_step * self.world + rank) * self.micro
        return self._perm[start : start + self.micro]


def check_global_batch(sampler: StepSampler, cfg: RunConfig, config_path: str) -> None:
    """A global batch larger than the training split gives no step: an error naming the flag or file that set its
    size (whichever of its two fields was overridden)."""
    if sampler.steps_per_epoch > 0:
        return
    names = ("optim.micro_batch_examples", "optim.gradient_accumulation_steps")
    flags = [w for w in dict.fromkeys(cfg.where(n, config_path) for n in names) if w.startswith("-")]
    origin = ", ".join(flags) or cfg.where(names[0], config_path)
    raise ConfigError(
        f"{origin}: optim.micro_batch_examples: a global batch of {sampler.global_batch} examples "
        f"(micro_batch_examples × gradient_accumulation_steps × {sampler.world} ranks) exceeds the {sampler.n} "
        "training examples"
    )
