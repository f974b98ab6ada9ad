"""Micro-batches in the run's packing layout (`train.packing`, see clo_fast/packing.py), made on the host.

The trainer, the reference pass and the held-out loss all go through one `MicroBatcher`, so the reference
log-probs come from the same path as training. A step's global batch is split into exactly G·W micro-batches
of near-equal token counts, micro-batch m of rank r taking group m·W + r: every rank runs the same number of
forwards (ZeRO-3 gathers parameters collectively; DeepSpeed counts micro-batches to the accumulation
boundary), the grouping does not depend on how the G·W micro-batches are spread over ranks (1 rank × 4 and
2 ranks × 2 see the same micro-batches), and the loss's global denominators keep the update exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from clo_fast.attention import PackingError, check_packing, default_packing
from clo_fast.config import ConfigError
from clo_fast.data.collate import check_token_range
from clo_fast.packing import ALL_SEQUENCES, PackedBatch, balance_micro_batches, build_packed_batch


def resolve_packing(requested: str, attn_implementation: str, device_type: str, where: str = "<config>") -> str:
    """`train.packing` as run: `auto` → the fastest exact mode for the backend and device; an unsupported
    combination is a start-up ConfigError naming the field and the fix."""
    mode = default_packing(attn_implementation, device_type) if requested == "auto" else requested
    try:
        check_packing(mode, attn_implementation, device_type)
    except PackingError as e:
        raise ConfigError(f"{where}: {e}") from None
    return mode


class MicroBatcher:
    """Tokenized CLO examples → `PackedBatch`es in one packing mode."""

    def __init__(self, mode: str, pad_token_id: int, pad_to_multiple_of: int, languages: Sequence[str] = ()):
        """`languages`: the run's target languages (data.target_langs); with two or more, every batch carries each
        example's language as an index into them (`PackedBatch.languages`), for the per-language metrics."""
        self.mode, self.pad_token_id, self.pad_to_multiple_of = mode, pad_token_id, pad_to_multiple_of
        self.languages = list(languages)

    def __call__(self, examples: Sequence[dict], sequences: Sequence[int] | None = None) -> PackedBatch:
        import dataclasses

        import torch

        batch = build_packed_batch(
            examples,
            self.mode,
            self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            sequences=ALL_SEQUENCES if sequences is None else tuple(sequences),
        )
        if len(self.languages) < 2:
            return batch
        index = [self.languages.index(ex["target_lang"]) for ex in examples]
        return dataclasses.replace(batch, languages=torch.tensor(index, dtype=torch.long))

    def step_batches(
        self,
        global_examples: Sequence[dict],
        accumulation_steps: int,
        sequences: Sequence[int] | None = None,
        *,
        world: int = 1,
        rank: int = 0,
    ) -> list[PackedBatch]:
        """Rank `rank`'s `accumulation_steps` micro-batches of one optimizer step, from the step's whole
        global batch (every rank passes the same examples, in the sampler's order)."""
        seqs = ALL_SEQUENCES if sequences is None else tuple(sequences)
        groups = balance_micro_batches(global_examples, self.mode, accumulation_steps * world, sequences=seqs)
        mine = [groups[m * world + rank] for m in range(accumulation_steps)]
        return [self([global_examples[i] for i in group], seqs) for group in mine]


def check_vocab_range(micro: Sequence[PackedBatch], vocab_size: int, where: str) -> None:
    """Host tensors, before the step: a tokenizer larger than the model's vocabulary stops here, named."""
    for b in micro:
        check_token_range({"input_ids": b.input_ids, "labels": b.head_labels.view(1, -1)}, vocab_size, where)
