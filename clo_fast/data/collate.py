"""Batching: tokenized CLO examples → padded tensors with shifted labels (docs/INTERFACES.md)."""

from __future__ import annotations

from collections.abc import Sequence

from clo_fast.constants import IGNORE_INDEX, SEQUENCES_PER_EXAMPLE


def collate_clo(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int = 64) -> dict:
    """Pad a list of tokenized examples into one CLO batch (docs/INTERFACES.md).

    Row 4b+k = example b, sequence k. Right padding. `labels` are shifted: labels[r, t] is the token
    position t predicts (input_ids[r, t+1]) when that is a response token, else IGNORE_INDEX.
    `response_tokens` [B,4] counts the response tokens of each sequence; `ref_logps` [B,4] float32 is
    included when every example has it.
    """
    import torch

    if not examples:
        raise ValueError("collate_clo: empty batch")
    rows_ids, rows_lab = [], []
    for b, ex in enumerate(examples):
        if len(ex["input_ids"]) != SEQUENCES_PER_EXAMPLE or len(ex["labels"]) != SEQUENCES_PER_EXAMPLE:
            raise ValueError(f"collate_clo: example {b} must hold 4 sequences, got {len(ex['input_ids'])}")
        for k in range(SEQUENCES_PER_EXAMPLE):
            ids, lab = list(ex["input_ids"][k]), list(ex["labels"][k])
            if len(ids) != len(lab):
                raise ValueError(f"collate_clo: example {b} sequence {k}: input_ids and labels lengths differ")
            rows_ids.append(ids)
            rows_lab.append(lab)
    longest = max(len(r) for r in rows_ids)
    m = max(1, int(pad_to_multiple_of or 1))
    T = max(m, -(-longest // m) * m)
    R = len(rows_ids)
    input_ids = torch.full((R, T), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((R, T), dtype=torch.long)
    unshifted = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, lab) in enumerate(zip(rows_ids, rows_lab, strict=True)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids, dtype=torch.long)
        attention[r, :n] = 1
        unshifted[r, :n] = torch.tensor(lab, dtype=torch.long)
    labels = shift_labels(unshifted)
    response_tokens = (labels != IGNORE_INDEX).sum(dim=1).view(-1, SEQUENCES_PER_EXAMPLE)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "response_tokens": response_tokens}
    if all(ex.get("ref_logps") is not None for ex in examples):
        batch["ref_logps"] = torch.tensor([list(ex["ref_logps"]) for ex in examples], dtype=torch.float32)
    return batch


def shift_labels(labels):
    """Unshifted labels [R,T] (the token at each position, IGNORE_INDEX where not scored) → shifted: position t
    holds what position t predicts, labels[:, t+1]; the last position predicts nothing."""
    import torch

    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def check_token_range(batch: dict, vocab_size: int, where: str = "batch") -> None:
    """Raise ValueError when a host batch holds a token id or label outside [0, vocab_size) (labels may be
    IGNORE_INDEX): a tokenizer larger than the model's vocabulary. Checked on the host where batches are
    built, so the training step needs no synchronisation for it."""
    for name in ("input_ids", "labels"):
        t = batch[name]
        bad = (t < 0) | (t >= vocab_size)
        if name == "labels":
            bad &= t != IGNORE_INDEX
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{where}: {name}[{r}, {c}] = {int(t[r, c])} is outside the model's vocabulary [0, {vocab_size}): "
                "the tokenizer does not match the model"
            )
