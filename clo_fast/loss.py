"""The CLO loss (docs/DESIGN.md §1) from per-sequence log-prob sums, and its materialized-logits reference.

Sequence order, per example b (always):
    0: (x_en, y_en)   1: (x_en, y_tgt)   2: (x_tgt, y_tgt)   3: (x_tgt, y_en)
English direction: chosen 0, rejected 1.  Target direction: chosen 2, rejected 3.

    L = λ · L_SFT + (1 − λ) · L_CL
    L_SFT = −Σ_b Σ_{k∈sft_sequences} logπ[b,k] / Σ_b Σ_{k∈sft_sequences} n[b,k]      (token mean; k = 2 by default)
    L_CL  = Σ_b Σ_dir −log σ(Δ[b,dir]) / (2B)
    Δ[b,en]  = β·[(logπ[b,0] − logπ_ref[b,0]) − (logπ[b,1] − logπ_ref[b,1])]
    Δ[b,tgt] = β·[(logπ[b,2] − logπ_ref[b,2]) − (logπ[b,3] − logπ_ref[b,3])]

Options of the preference term (TRL's names; the defaults give the loss above):
    label_smoothing ε (robust / conservative DPO): −(1−ε)·log σ(Δ) − ε·log σ(−Δ)
    loss_type "ipo":  (Δ/β − 1/(2β))²   (IPO; TRL's "ipo" also length-normalises: add length_normalize)
    length_normalize: every logπ and logπ_ref in Δ is divided by its sequence's response-token count n[b,k]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clo_fast.constants import IGNORE_INDEX, LOSS_TYPES
from clo_fast.ops import token_logps


def preference_loss(margins: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-triple loss of the preference term from margins Δ = β·(chosen − rejected log-ratio)."""
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(margins)
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margins)
        return loss
    if loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only")
        return (margins / beta - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _check(policy_logps, ref_logps, response_tokens, beta, lam, sft_sequences, validate):
    if policy_logps.dim() != 2 or policy_logps.shape[1] != 4:
        raise ValueError(f"policy_logps must be [B, 4] (sequences 0..3 per example), got {tuple(policy_logps.shape)}")
    if policy_logps.shape[0] == 0:
        raise ValueError("policy_logps has B = 0 examples: nothing to compute a loss on")
    if ref_logps is not None and ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps must match policy_logps {tuple(policy_logps.shape)}, got {tuple(ref_logps.shape)}")
    if response_tokens.shape != policy_logps.shape:
        raise ValueError(f"response_tokens must be [B, 4] like policy_logps, got {tuple(response_tokens.shape)}")
    if not (beta > 0):
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not sft_sequences or any(k not in (0, 1, 2, 3) for k in sft_sequences):
        raise ValueError(f"sft_sequences must be a non-empty subset of 0..3, got {sft_sequences}")
    if not validate:
        return
    # Value checks read tensors on the host: the training step passes validate=False and guarantees them upstream.
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = torch.nonzero(~torch.isfinite(t))[0].tolist()
            raise ValueError(f"{name} has a non-finite value at [example {bad[0]}, sequence {bad[1]}]")
    if bool((response_tokens <= 0).any()):
        bad = torch.nonzero(response_tokens <= 0)[0].tolist()
        raise ValueError(
            f"response_tokens is {int(response_tokens[bad[0], bad[1]])} at [example {bad[0]}, sequence {bad[1]}]: "
            "every sequence needs at least one response token"
        )


def clo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    response_tokens: torch.Tensor,
    beta: float = 0.1,
    lam: float = 0.5,
    *,
    sft_sequences: tuple[int, ...] = (2,),
    sft_denominator: torch.Tensor | float | None = None,
    cl_denominator: torch.Tensor | float | None = None,
    validate: bool = True,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    length_normalize: bool = False,
):
    """CLO loss from per-sequence log-prob sums. Returns (loss, metrics).

    policy_logps [B,4]: Σ of response-token log π per sequence (order in the module docstring).
    ref_logps [B,4] or None: the same under the frozen reference; None = reference-free (π_ref terms dropped).
    response_tokens [B,4]: response-token count per sequence.
    lam = 1 gives the target-language NLL only (the SFT baseline); lam = 0 the two-direction DPO loss.

    Normalisation under gradient accumulation and data parallelism. By default both terms are means over
    this call's batch: L_SFT over its sequence-2 tokens, L_CL over its 2B triples. That is the loss of one
    optimizer step only when the step sees one micro-batch on one rank. For G accumulation steps on W
    ranks, pass the step's *global* counts scaled by the number of micro-batches that will be averaged:
        sft_denominator = (Σ over all G·W micro-batches of the sft tokens) / (G·W)
        cl_denominator  = (Σ over all G·W micro-batches of the triples, = 2·B_global) / (G·W)
    Each micro-batch then contributes its *sums* divided by the global counts, times G·W; DeepSpeed's
    1/G loss scaling and its mean over ranks cancel the G·W, so the accumulated gradient is exactly that
    of the token-mean NLL and triple-mean DPO over the whole global batch, however tokens are spread over
    micro-batches (tested in tests/test_loss.py).

    metrics: detached 0-dim tensors named as TRL names them — loss, nll, cl_loss, rewards/{chosen,rejected,
    margins,accuracies}, logps/{chosen,rejected} (both directions pooled) and the same per direction under
    `en/` and `tgt/` prefixes. Rewards are β·(logπ − logπ_ref). No host synchronisation unless validate=True.

    loss_type / label_smoothing / length_normalize: see the module docstring (preference term only; the NLL
    term and the defaults are unchanged). With length_normalize the rewards are per-token too.
    """
    _check(policy_logps, ref_logps, response_tokens, beta, lam, sft_sequences, validate)
    n_ex = policy_logps.shape[0]
    sft_idx = list(sft_sequences)
    nll_sum = -policy_logps[:, sft_idx].sum()
    sft_den = response_tokens[:, sft_idx].sum().to(policy_logps.dtype) if sft_denominator is None else sft_denominator
    nll = nll_sum / sft_den

    chosen, rejected = preference_rewards(policy_logps, ref_logps, response_tokens, beta, length_normalize)
    margins = chosen - rejected
    per_triple = preference_loss(margins, beta, loss_type, label_smoothing)
    cl_den = 2 * n_ex if cl_denominator is None else cl_denominator
    cl = per_triple.sum() / cl_den

    loss = lam * nll + (1.0 - lam) * cl

    with torch.no_grad():
        pol_chosen = torch.stack([policy_logps[:, 0], policy_logps[:, 2]], dim=1).detach()
        pol_rejected = torch.stack([policy_logps[:, 1], policy_logps[:, 3]], dim=1).detach()
        metrics = {"loss": loss.detach(), "nll": nll.detach(), "cl_loss": cl.detach()}

        def add(prefix, sl):
            metrics[f"{prefix}rewards/chosen"] = chosen[:, sl].mean().detach()
            metrics[f"{prefix}rewards/rejected"] = rejected[:, sl].mean().detach()
            metrics[f"{prefix}rewards/margins"] = margins[:, sl].mean().detach()
            metrics[f"{prefix}rewards/accuracies"] = (margins[:, sl] > 0).float().mean()
            metrics[f"{prefix}logps/chosen"] = pol_chosen[:, sl].mean()
            metrics[f"{prefix}logps/rejected"] = pol_rejected[:, sl].mean()

        add("", slice(None))
        add("en/", slice(0, 1))
        add("tgt/", slice(1, 2))
    return loss, metrics


def preference_rewards(policy_logps, ref_logps, response_tokens, beta: float, length_normalize: bool = False):
    """(chosen, rejected) rewards [B, 2] (en direction, target direction): β·(logπ − logπ_ref) of sequences 0, 2
    and 1, 3 (per token with length_normalize; without π_ref when ref_logps is None)."""
    logratio = policy_logps if ref_logps is None else policy_logps - ref_logps.to(policy_logps.dtype)
    if length_normalize:
        logratio = logratio / response_tokens.to(logratio.dtype)
    rewards = beta * logratio
    chosen = torch.stack([rewards[:, 0], rewards[:, 2]], dim=1)
    rejected = torch.stack([rewards[:, 1], rewards[:, 3]], dim=1)
    return chosen, rejected


def gather_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Per-sequence Σ log softmax(logits)[label] and response-token counts from logits [S,T,V], labels [S,T]."""
    return token_logps(logits, labels, ignore_index).sum(-1), (labels != ignore_index).sum(-1)


def reference_clo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor | None,
    beta: float = 0.1,
    lam: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    **kwargs,
):
    """The yardstick: CLO loss from materialized logits [4B,T,V] and labels [4B,T] (rows 4b+k).

    Materializes fp32 log-softmax over the full vocabulary (O(4B·T·V) memory): for tests and benchmarks.
    Extra keyword arguments go to `clo_loss`.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [4B,T,V] and labels [4B,T]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] % 4 != 0:
        raise ValueError(f"logits has {logits.shape[0]} rows; CLO needs 4 sequences per example (4B rows)")
    logps, counts = gather_sequence_logps(logits, labels, ignore_index)
    n_ex = logits.shape[0] // 4
    return clo_loss(logps.view(n_ex, 4), ref_logps, counts.view(n_ex, 4), beta, lam, **kwargs)
