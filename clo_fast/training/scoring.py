"""No-grad log-probs of a whole split, spread over the ranks: the reference pass and the held-out loss."""

from __future__ import annotations

import math

import torch

from clo_fast.constants import SEQUENCES_PER_EXAMPLE
from clo_fast.loss import clo_loss
from clo_fast.training.distributed import rank, to_device, world_size
from clo_fast.training.step import SFT_ONLY_METRICS, LossSetup, batch_field, policy_logps


@torch.no_grad()
def score_dataset(engine, ds, collate, micro: int, device, sequences=None, desc="scoring"):
    """Per-sequence log-prob sums [N,4] and response-token counts [N,4] of a whole dataset, on every rank.
    `collate(examples, sequences)` makes a batch in the training layout (the same packing as training).

    Ranks take interleaved examples; every rank runs the same number of forwards (ZeRO-3 gathers
    parameters collectively), padding with repeats that are dropped afterwards."""
    from tqdm.auto import tqdm

    me, world, n = rank(), world_size(), len(ds)
    per_rank = math.ceil(n / world)
    n_batches = math.ceil(per_rank / micro)
    mine = [me + world * i for i in range(per_rank)]
    logps = torch.zeros(n_batches * micro, SEQUENCES_PER_EXAMPLE, device=device)
    counts = torch.zeros(n_batches * micro, SEQUENCES_PER_EXAMPLE, device=device)
    was_training = engine.module.training
    engine.eval()
    for b in tqdm(range(n_batches), desc=desc, disable=me != 0, leave=False):
        idx = mine[b * micro : (b + 1) * micro]
        idx = [i if i < n else 0 for i in idx] + [0] * (micro - len(idx))
        batch = to_device(collate([ds[i] for i in idx], sequences), device)
        logps[b * micro : (b + 1) * micro] = policy_logps(engine, batch, sequences).float()
        counts[b * micro : (b + 1) * micro] = batch_field(batch, "response_tokens").float()
    engine.train(was_training)
    if world > 1:
        parts_l = [torch.empty_like(logps) for _ in range(world)]
        parts_c = [torch.empty_like(counts) for _ in range(world)]
        torch.distributed.all_gather(parts_l, logps)
        torch.distributed.all_gather(parts_c, counts)
    else:
        parts_l, parts_c = [logps], [counts]
    out_l = torch.zeros(n, SEQUENCES_PER_EXAMPLE, device=device)
    out_c = torch.zeros(n, SEQUENCES_PER_EXAMPLE, device=device)
    for r in range(world):
        ids = torch.arange(r, n, world, device=device)
        out_l[ids] = parts_l[r][: len(ids)]
        out_c[ids] = parts_c[r][: len(ids)]
    return out_l, out_c


def held_out_loss(engine, ds, collate, micro: int, device, setup: LossSetup) -> dict[str, float]:
    """CLO loss and metrics over the whole held-out split (exact: one clo_loss call on all its sequences)."""
    logps, counts = score_dataset(engine, ds, collate, micro, device, setup.sequences_run, desc="eval")
    ref = None
    if "ref_logps" in ds.column_names:
        ref = torch.tensor(ds["ref_logps"], device=device, dtype=torch.float32)
    _, m = clo_loss(
        logps, ref, counts, setup.beta, setup.lam, sft_sequences=setup.sft_sequences, validate=False, **setup.options
    )
    keep = m if setup.sequences_run is None else {k: v for k, v in m.items() if k in SFT_ONLY_METRICS}
    out = {f"eval/{k}": float(v) for k, v in keep.items()}
    scored_english = setup.sequences_run is None or 0 in setup.sequences_run
    return out | (english_nll(logps, counts, ref) if scored_english else {})


def english_nll(logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None) -> dict[str, float]:
    """NLL per token of the held-out English answers under their English prompts ([x_en|y_en], sequence 0), for
    the policy and (when cached) the reference: what the English guard compares."""
    tokens = counts[:, 0].sum().clamp_min(1)
    out = {"eval/en/nll_per_token": float(-logps[:, 0].sum() / tokens)}
    if ref is not None:
        out["eval/en/ref_nll_per_token"] = float(-ref[:, 0].sum() / tokens)
    return out
