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
from clo_fast.loss import clo_loss, preference_rewards
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
        ref = batch_field(batch, "ref_logps") if self.use_reference else None
        loss, metrics = clo_loss(
            logps,
            ref,
            batch_field(batch, "response_tokens"),
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


def batch_field(batch, name: str):
    """`response_tokens` [B,4] / `ref_logps` [B,4] (or None) of a padded dict batch or a `PackedBatch`."""
    if isinstance(batch, dict):
        return batch.get(name)
    return getattr(batch, name)


def policy_logps(engine, batch, sequences: tuple[int, ...] | None) -> torch.Tensor:
    """[B,4] per-sequence log-prob sums; with `sequences` only those are run, the others are 0.

    A `clo_fast.packing.PackedBatch` (any packing mode) was built with its sequences already chosen and
    sends only labelled rows through the head: one forward, `engine(batch)`."""
    n_examples = batch_field(batch, "response_tokens").shape[0]
    if not isinstance(batch, dict):
        return engine(batch).view(n_examples, SEQUENCES_PER_EXAMPLE)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if sequences is None:
        return engine(ids, mask, labels).view(n_examples, SEQUENCES_PER_EXAMPLE)
    rows = torch.arange(n_examples)[:, None] * SEQUENCES_PER_EXAMPLE + torch.tensor(sequences)
    rows = h2d(rows.reshape(-1), ids.device)
    part = engine(ids[rows], mask[rows], labels[rows]).view(n_examples, len(sequences))
    full = part.new_zeros(n_examples, SEQUENCES_PER_EXAMPLE)
    full[:, list(sequences)] = part
    return full


def train_step(
    engine, micro_batches: list, setup: LossSetup, device, global_examples: int | None = None, n_languages: int = 0
) -> dict[str, torch.Tensor]:
    """Run one optimizer step over `micro_batches` (host tensors — padded dicts or `PackedBatch`es of any
    size — this rank's share of the global batch).

    `global_examples`: examples in the step's global batch (known on the host); without it every rank is
    taken to hold the same number. Returns the step's metrics as device scalars, averaged over the
    micro-batches (no host sync). `n_languages` (data.target_langs): batches carry their examples' languages, and
    per-language metrics (`LanguageMetrics`) are added for each of them.
    """
    accumulation, world = len(micro_batches), world_size()
    sft_columns = list(setup.sft_sequences)
    tokens = [batch_field(b, "response_tokens") for b in micro_batches]  # host tensors: no sync
    sft_tokens = sum(int(t[:, sft_columns].sum()) for t in tokens)
    sft_denominator = all_reduce_sum(h2d(torch.tensor(float(sft_tokens)), device)) / (accumulation * world)
    # 2 preference triples per example over the global batch, divided by G·W
    if global_examples is None:  # equal shares: W × this rank's examples
        global_examples = world * sum(t.shape[0] for t in tokens)
    cl_denominator = 2.0 * global_examples / (accumulation * world)
    totals: dict[str, torch.Tensor] = {}
    by_language = LanguageMetrics(micro_batches, setup, sft_columns, n_languages)
    for host_batch in micro_batches:
        batch = to_device(host_batch, device)
        logps = policy_logps(engine, batch, setup.sequences_run)
        loss, metrics = setup.loss(logps, batch, sft_denominator=sft_denominator, cl_denominator=cl_denominator)
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the update at the accumulation boundary
        for k, v in metrics.items():
            totals[k] = totals[k] + v / accumulation if k in totals else v / accumulation
        by_language.add(logps.detach(), batch)
    return {**totals, **by_language.result()}


def name_languages(metrics: dict, languages: list[str]) -> dict:
    """`nll/1` → `nll/ko` for the run's languages (data.target_langs), as fidelity/<lang> is named."""
    out = {}
    for k, v in metrics.items():
        head, _, tail = k.rpartition("/")
        out[f"{head}/{languages[int(tail)]}" if head and tail.isdigit() and languages else k] = v
    return out


class LanguageMetrics:
    """Per-language metrics of one step on this rank when batches carry their examples' languages
    (data.target_langs; `PackedBatch.languages`): `nll/<i>` (token mean over the NLL's sequences) and, when the
    preference term runs, `rewards/margins/<i>` and `rewards/accuracies/<i>` over that language's triples, keyed
    by the language's index (the trainer renames them). Sums stay on the device; the counts come from the host
    batches, so nothing is read back. Every language gets its keys on every rank, and the means are over the whole
    step: a language with no example in one rank's share counts there as 0 examples, not as a 0 mean."""

    def __init__(self, micro_batches: list, setup: LossSetup, sft_columns: list[int], n_languages: int):
        self.setup, self.sft_columns = setup, sft_columns
        self.langs = [batch_field(b, "languages") for b in micro_batches]
        self.on = n_languages > 1 and bool(micro_batches) and all(lang is not None for lang in self.langs)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.preference = setup.sequences_run is None
        if self.on:
            tokens = [batch_field(b, "response_tokens") for b in micro_batches]
            for i in range(n_languages):
                self.counts[f"nll/{i}"] = sum(
                    int(t[lang == i][:, sft_columns].sum()) for t, lang in zip(tokens, self.langs, strict=True)
                )
                triples = 2 * sum(int((lang == i).sum()) for lang in self.langs)
                self.counts[f"rewards/margins/{i}"] = self.counts[f"rewards/accuracies/{i}"] = triples

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add(self, logps: torch.Tensor, batch) -> None:
        if not self.on:
            return
        s = self.setup
        languages = batch_field(batch, "languages")
        nll = -logps[:, self.sft_columns].sum(dim=1)  # [B]
        margins = None
        if self.preference:
            ref = batch_field(batch, "ref_logps") if s.use_reference else None
            tokens = batch_field(batch, "response_tokens")
            chosen, rejected = preference_rewards(logps, ref, tokens, s.beta, s.length_normalize)
            margins = chosen - rejected  # [B, 2]
        for name in self.counts:
            if not name.startswith("nll/"):
                continue
            i = int(name.split("/")[-1])
            mask = (languages == i).to(logps.dtype)
            self._add(name, (nll * mask).sum())
            if margins is not None:
                self._add(f"rewards/margins/{i}", (margins * mask[:, None]).sum())
                self._add(f"rewards/accuracies/{i}", ((margins > 0).to(logps.dtype) * mask[:, None]).sum())

    def result(self) -> dict[str, torch.Tensor]:
        """Means over the whole step's global batch: sums and counts are added over ranks first (one all-reduce of
        one device vector, no host sync), so a language absent from a rank's share does not pull the mean."""
        names = [k for k in self.counts if self.preference or k.startswith("nll/")]
        if not names:
            return {}
        sums = torch.stack([self.sums[k] for k in names])
        counts = h2d(torch.tensor([float(self.counts[k]) for k in names], dtype=sums.dtype), sums.device)
        totals = all_reduce_sum(torch.cat([sums, counts]))
        means = totals[: len(names)] / totals[len(names) :].clamp(min=1)
        return dict(zip(names, means.unbind(), strict=True))


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became inf/NaN: the run stops before anything is saved or exported."""


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss was not finite (`observe`: no host sync), and
    raises at `check`, which the loop calls where it already synchronizes (logging) and before every
    checkpoint and the export. Ranks agree by an all-reduce (min) of the first bad step, so all stop."""

    NONE = torch.iinfo(torch.int64).max

    def __init__(self, device):
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def observe(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        bad = ~torch.isfinite(metrics["loss"].detach())
        self.first_bad = torch.where(bad & (self.first_bad == self.NONE), step, self.first_bad)

    def check(self, step: int, grad_norm) -> None:
        """Raise NonFiniteError naming the step (collective: every rank calls it at the same step)."""
        first = self.first_bad.clone()
        if world_size() > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        first = int(first)
        if first != self.NONE:
            raise NonFiniteError(
                f"step {first}: the training loss is not finite (inf/NaN); stopped before saving or exporting. "
                "Lower optim.lr, check the data (clo.beta, empty responses) or resume from an earlier checkpoint"
            )
        norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm), dtype=torch.float64)
        if grad_norm is not None and not bool(torch.isfinite(norm)):
            raise NonFiniteError(
                f"step {step}: the gradient norm is {float(norm)}; stopped before saving or exporting. "
                "Lower optim.lr or resume from an earlier checkpoint"
            )
