"""One optimizer step: the forward of every micro-batch, the CLO loss with the step's global denominators,
backward. Works on any `engine` with DeepSpeed's three calls — `engine(input_ids, attention_mask, labels)`
→ per-sequence log-prob sums, `engine.backward(loss)` (which divides by the accumulation steps G) and
`engine.step()` (which updates at the accumulation boundary) — so it runs in-process in tests.

Averaging. One optimizer step sees G micro-batches on each of W ranks. `clo_loss` gets the step's global
denominators divided by G·W (see its docstring): the backward divides by G and the gradient all-reduce
averages over W, so the update is the gradient of the token-mean NLL and the triple-mean DPO loss over the
whole global batch, however tokens are spread over micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clo_fast.config import CLOConfig
from clo_fast.constants import SEQUENCES_PER_EXAMPLE
from clo_fast.loss import clo_loss
from clo_fast.training.distributed import all_reduce_sum, h2d, to_device, world_size

MODE_LAMBDA = {"sft": 1.0, "dpo": 0.0}  # clo mode uses clo.lam
SFT_ONLY_METRICS = ("loss", "nll")  # without the contrastive sequences, only these are defined


@dataclass(frozen=True)
class LossSetup:
    """What `clo.mode` means for the step: λ, the NLL sequences, whether a reference pass is needed, and which
    of the four sequences are run at all (sft mode: only the NLL ones; None = all four)."""

    beta: float
    lam: float
    sft_sequences: tuple[int, ...]
    use_reference: bool
    sequences_run: tuple[int, ...] | None
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    length_normalize: bool = False

    @classmethod
    def from_config(cls, clo: CLOConfig) -> LossSetup:
        sft = tuple(clo.sft_sequences)
        return cls(
            beta=clo.beta,
            lam=MODE_LAMBDA.get(clo.mode, clo.lam),
            sft_sequences=sft,
            use_reference=not (clo.reference_free or clo.mode == "sft"),
            sequences_run=tuple(sorted(sft)) if clo.mode == "sft" else None,
            loss_type=clo.loss_type,
            label_smoothing=clo.label_smoothing,
            length_normalize=clo.length_normalize,
        )

    @property
    def options(self) -> dict:
        """The preference-term options, as clo_loss keywords."""
        return {
            "loss_type": self.loss_type,
            "label_smoothing": self.label_smoothing,
            "length_normalize": self.length_normalize,
        }

    def loss(self, logps, batch, *, sft_denominator=None, cl_denominator=None):
        """(loss, metrics) of one batch; metrics limited to the ones defined for this mode."""
        ref = batch.get("ref_logps") if self.use_reference else None
        loss, metrics = clo_loss(
            logps,
            ref,
            batch["response_tokens"],
            self.beta,
            self.lam,
            sft_sequences=self.sft_sequences,
            sft_denominator=sft_denominator,
            cl_denominator=cl_denominator,
            validate=False,
            **self.options,
        )
        if self.sequences_run is not None:
            metrics = {k: metrics[k] for k in SFT_ONLY_METRICS}
        return loss, metrics


def policy_logps(engine, batch: dict, sequences: tuple[int, ...] | None) -> torch.Tensor:
    """[B,4] per-sequence log-prob sums; with `sequences` only those are run, the others are 0."""
    n_examples = batch["response_tokens"].shape[0]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if sequences is None:
        return engine(ids, mask, labels).view(n_examples, SEQUENCES_PER_EXAMPLE)
    rows = torch.arange(n_examples)[:, None] * SEQUENCES_PER_EXAMPLE + torch.tensor(sequences)
    rows = h2d(rows.reshape(-1), ids.device)
    part = engine(ids[rows], mask[rows], labels[rows]).view(n_examples, len(sequences))
    full = part.new_zeros(n_examples, SEQUENCES_PER_EXAMPLE)
    full[:, list(sequences)] = part
    return full


def train_step(engine, micro_batches: list[dict], setup: LossSetup, device) -> dict[str, torch.Tensor]:
    """Run one optimizer step over `micro_batches` (host tensors, this rank's share of the global batch).

    Returns the step's metrics as device scalars, averaged over the micro-batches (no host sync).
    """
    accumulation, world = len(micro_batches), world_size()
    sft_columns = list(setup.sft_sequences)
    sft_tokens = sum(int(b["response_tokens"][:, sft_columns].sum()) for b in micro_batches)  # host: no sync
    sft_denominator = all_reduce_sum(h2d(torch.tensor(float(sft_tokens)), device)) / (accumulation * world)
    # 2 preference triples per example over the global batch, divided by G·W: 2 × examples per micro-batch
    cl_denominator = 2.0 * micro_batches[0]["response_tokens"].shape[0]
    totals: dict[str, torch.Tensor] = {}
    for host_batch in micro_batches:
        batch = to_device(host_batch, device)
        logps = policy_logps(engine, batch, setup.sequences_run)
        loss, metrics = setup.loss(logps, batch, sft_denominator=sft_denominator, cl_denominator=cl_denominator)
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the update at the accumulation boundary
        for k, v in metrics.items():
            totals[k] = totals[k] + v / accumulation if k in totals else v / accumulation
    return totals
