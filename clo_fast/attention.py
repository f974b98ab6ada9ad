"""Attention over packed micro-batches (clo_fast/packing.py lays the tokens out; this module confines attention).

Which packing modes each attention backend computes exactly, on which device; the masks that confine a packed
token to its own document and branch (dense, windowed, flex BlockMask); the "clo_packed_sdpa" attention
registered with transformers; and the backbone keyword arguments a batch needs (`attention_inputs`).

It imports only torch (transformers when registering), so the config can validate `model.attn_implementation`
and `train.packing` against the same facts the model uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from clo_fast.constants import PACKING_MODES


class PackingError(ValueError):
    """An unsupported packing / attention-backend / device combination (a start-up configuration error)."""


# branch ids: which part of a document a token is in. A token attends to earlier tokens of its document
# whose branch is PROMPT or its own branch.
PROMPT, FIRST_RESPONSE, SECOND_RESPONSE = 0, 1, 2


def supported_packing(attn_implementation: str, device_type: str) -> tuple[str, ...]:
    """Packing modes that are exact with this attention backend on this device type (`ATTENTION_BACKENDS`;
    a backend not in the table: `none` only)."""
    backend = ATTENTION_BACKENDS.get(attn_implementation)
    if backend is None:
        return ("none",)
    return backend.cpu_packing if device_type == "cpu" and backend.cpu_packing is not None else backend.packing


def default_packing(attn_implementation: str, device_type: str) -> str:
    """The fastest exact mode the backend supports (PACKING_MODES runs slowest to fastest)."""
    ok = supported_packing(attn_implementation, device_type)
    for mode in reversed(PACKING_MODES):
        if mode in ok:
            return mode
    return "none"


def check_packing(mode: str, attn_implementation: str, device_type: str) -> None:
    """Raise PackingError with a message naming the fix when `mode` is not exact on this backend/device."""
    if mode not in PACKING_MODES:
        raise PackingError(f"train.packing must be one of {'|'.join(PACKING_MODES)}, got {mode!r}")
    ok = supported_packing(attn_implementation, device_type)
    if mode in ok:
        return
    backend = ATTENTION_BACKENDS.get(attn_implementation)
    refusal = None
    if backend is not None:
        refusal = backend.cpu_refusal if device_type == "cpu" and backend.cpu_packing is not None else backend.refusal
    why, fix = refusal or (
        f"attention backend {attn_implementation!r} has no packed-sequence mask support here",
        "use model.attn_implementation: sdpa or flex_attention, or train.packing: none",
    )
    raise PackingError(
        f"train.packing: {mode!r} is not supported with model.attn_implementation="
        f"{attn_implementation!r} on {device_type}: {why}; {fix} "
        f"(supported here: {', '.join(ok)})"
    )


def dense_packed_mask(doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """[1,1,L,L] bool, True where query i may attend key j: same document, j ≤ i, and j in the prompt or in
    i's own branch. Built where the ids are (the device at step time): O(L²) bools, no host round trip."""
    L = doc_ids.shape[0]
    idx = torch.arange(L, device=doc_ids.device)
    allowed = (doc_ids[:, None] == doc_ids[None, :]) & (idx[None, :] <= idx[:, None])
    allowed &= (branch_ids[None, :] == PROMPT) | (branch_ids[None, :] == branch_ids[:, None])
    return allowed.view(1, 1, L, L)


def flex_block_mask(doc_ids: torch.Tensor, branch_ids: torch.Tensor):
    """The same rule as `dense_packed_mask` as a flex_attention BlockMask: blocks with no allowed pair are
    skipped, so attention costs ≈ Σ_documents n² instead of L²."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, kv):
        same_doc = doc_ids[q] == doc_ids[kv]
        visible_branch = (branch_ids[kv] == PROMPT) | (branch_ids[kv] == branch_ids[q])
        return same_doc & (kv <= q) & visible_branch

    L = doc_ids.shape[0]
    return create_block_mask(allowed, B=1, H=None, Q_LEN=L, KV_LEN=L, device=doc_ids.device)


def windowed_packed_mask(
    doc_ids: torch.Tensor, branch_ids: torch.Tensor, windows: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """[1,1,L,W] bool, W = the widest span: row i holds `dense_packed_mask` of its span (columns = keys of the
    span, from its start; columns past the span's width are False). Σ span·W bools instead of L².

    Built in one pass for all spans: the ids laid out [S, W] (span-major, -1 past a span's end), the rule
    evaluated on [S, W, W], then the rows of real tokens kept (in order, since spans tile the stream)."""
    L, dev = doc_ids.shape[0], doc_ids.device
    width = max(e - s for s, e in windows)
    idx = torch.full((len(windows), width), -1, dtype=torch.long)
    for i, (s, e) in enumerate(windows):
        idx[i, : e - s] = torch.arange(s, e)
    idx = idx.to(dev)
    real = idx >= 0
    safe = idx.clamp(min=0)
    doc = torch.where(real, doc_ids[safe], -1)
    branch = branch_ids[safe]
    col = torch.arange(width, device=dev)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (col[:, None] >= col[None, :]) & real[:, None, :]
    allowed &= (branch[:, None, :] == PROMPT) | (branch[:, None, :] == branch[:, :, None])
    rows = allowed.view(-1, width)[real.view(-1)]
    if rows.shape[0] != L:
        raise ValueError(f"windows must cover the {L} packed tokens once each, got {windows}")
    return rows.view(1, 1, L, width)


_STOCK_SDPA = None
PACKED_SDPA = "clo_packed_sdpa"  # the attention name packed sdpa models run under (`use_packed_sdpa`)


def _windowed_sdpa_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' sdpa attention, plus packed spans: with `clo_windows` in the kwargs (from
    `attention_inputs`), one sdpa call per span with its slice of the [1,1,L,W] mask; otherwise the stock
    function, unchanged. Exact: no query attends across a span boundary (spans hold whole documents).

    The spans tile [0, L) in order (`packing._group_windows`), so q/k/v are cut with one `split` each: its backward
    is one concatenation, where a slice per span would allocate and fill a full-length zero gradient per
    span and tensor (measured: ~25% of the attention's time at the demo shape on CPU). On CPU grouped-query
    heads go to sdpa as they are (`enable_gqa`); on CUDA they are repeated, since a masked sdpa with
    `enable_gqa` falls back to the math kernel there."""
    windows = kwargs.pop("clo_windows", None)
    if windows is None:
        return _STOCK_SDPA(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    gqa = groups > 1 and query.device.type == "cpu"
    if groups > 1 and not gqa:  # each KV head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    sizes = [e - s for s, e in windows]
    tiled = windows[0][0] == 0 and windows[-1][1] == query.shape[2]
    tiled = tiled and all(windows[i][1] == windows[i + 1][0] for i in range(len(windows) - 1))
    if tiled:
        qs, ks, vs = query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)
    else:  # not produced by build_packed_batch; kept general
        qs = [query[:, :, s:e] for s, e in windows]
        ks = [key[:, :, s:e] for s, e in windows]
        vs = [value[:, :, s:e] for s, e in windows]
    extra = {"enable_gqa": True} if gqa else {}
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask[:, :, s:e, : e - s], dropout_p=dropout, scale=scaling, **extra
        )
        for q, k, v, (s, e) in zip(qs, ks, vs, windows, strict=True)
    ]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def register_packed_sdpa() -> None:
    """Register `_windowed_sdpa_forward` as its own attention name, "clo_packed_sdpa", in transformers'
    AttentionInterface, with sdpa's mask function under the same name in AttentionMaskInterface (idempotent).
    transformers' "sdpa" entry is left as it is: other models in the process are untouched."""
    global _STOCK_SDPA
    if _STOCK_SDPA is not None:
        return
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    _STOCK_SDPA = AttentionInterface._global_mapping["sdpa"]
    AttentionInterface.register(PACKED_SDPA, _windowed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, AttentionMaskInterface._global_mapping["sdpa"])


def use_packed_sdpa(model) -> None:
    """Point an sdpa model's attention at "clo_packed_sdpa" (idempotent; a model on another backend is left
    alone). Calls without `clo_windows` — `none` batches, evaluation, generation — reach transformers' sdpa
    function unchanged, and masks are sdpa's; the name is not saved with the config (`_attn_implementation`
    is not serialised), so an exported model loads as sdpa. Permanent on the model rather than per forward:
    gradient checkpointing re-runs the layers' forwards during backward. A model whose attention layers
    read another config (still "sdpa") would get the [1,1,L,W] mask and fail loudly on its shape."""
    register_packed_sdpa()
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
        cfg._attn_implementation = PACKED_SDPA


def attention_inputs(batch, attn_implementation: str, dtype: torch.dtype = torch.float32) -> dict:
    """Backbone keyword arguments that confine attention as the batch's (a `clo_fast.packing.PackedBatch`)
    layout needs: the padding mask for `none`, else what the backend's `packed_inputs` builds.

    A prepared 4D mask / BlockMask makes transformers use it as given (no mask building, no packed-sequence
    detection from position ids). Flash attention gets the host-made cu_seqlens and max length, so its
    layers do not derive them from position ids; transformers' mask preparation still reads the position
    ids once per forward to detect packing (one host sync per forward with flash_attention_2).
    """
    if batch.mode == "none":
        return {"attention_mask": batch.attention_mask}
    device_type = batch.input_ids.device.type
    check_packing(batch.mode, attn_implementation, device_type)
    return ATTENTION_BACKENDS[attn_implementation].packed_inputs(batch, dtype)


def _varlen_inputs(batch, dtype: torch.dtype) -> dict:
    cu = batch.cu_seqlens
    return {
        "attention_mask": None,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": batch.max_seqlen,
        "max_length_k": batch.max_seqlen,
    }


def _block_mask_inputs(batch, dtype: torch.dtype) -> dict:
    return {"attention_mask": flex_block_mask(batch.doc_ids, batch.branch_ids)}


def _sdpa_inputs(batch, dtype: torch.dtype) -> dict:
    if batch.windows is not None:
        register_packed_sdpa()
        return {
            "attention_mask": windowed_packed_mask(batch.doc_ids, batch.branch_ids, batch.windows),
            "clo_windows": batch.windows,
        }
    return {"attention_mask": dense_packed_mask(batch.doc_ids, batch.branch_ids)}


def _additive_mask_inputs(batch, dtype: torch.dtype) -> dict:
    mask = dense_packed_mask(batch.doc_ids, batch.branch_ids)
    zero = torch.zeros((), dtype=dtype, device=mask.device)  # eager adds the mask to the scores
    return {"attention_mask": torch.where(mask, zero, torch.finfo(dtype).min)}


# ------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class AttentionBackend:
    """One `model.attn_implementation` (transformers' name for it) and what it does with packed batches."""

    packing: tuple[str, ...]  # packing modes it computes exactly (on CUDA and other accelerators)
    packed_inputs: Callable  # (batch, dtype) -> backbone keyword arguments for a packed batch
    cpu_packing: tuple[str, ...] | None = None  # on CPU, when that differs
    refusal: tuple[str, str] | None = None  # (why, fix) for a packing mode outside `packing`
    cpu_refusal: tuple[str, str] | None = None  # the same on CPU
    requires: tuple[str, str] | None = None  # (module, how to install it): checked when the model loads


_FLASH_REFUSAL = (
    "flash attention's variable-length kernel attends to one contiguous segment per token, but in "
    "prefix_shared the second response must see its prompt and skip the first response",
    "use train.packing: padding_free with flash_attention_2, or model.attn_implementation: flex_attention / sdpa",
)

# The attention backends a run may use: config validates model.attn_implementation against these names, the
# packing check and `attention_inputs` read their capabilities. Adding a backend is one entry here.
#   sdpa / eager: every mode (a dense [1,1,L,L] mask, or sdpa per window; attention cost L² — keep the token
#     budget moderate). flex_attention: every mode on CUDA (a block-sparse BlockMask); on CPU torch has no flex
#     backward. flash_attention_2/3: none and padding_free (variable-length kernel over cu_seqlens);
#     prefix_shared needs the second response to skip the first, which a contiguous varlen segment cannot express.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(PACKING_MODES, _sdpa_inputs),
    "eager": AttentionBackend(PACKING_MODES, _additive_mask_inputs),
    "flex_attention": AttentionBackend(
        PACKING_MODES,
        _block_mask_inputs,
        cpu_packing=("none",),
        cpu_refusal=(
            "torch's flex_attention has no backward on CPU",
            "use model.attn_implementation: sdpa on CPU (every packing mode works with it)",
        ),
    ),
    "flash_attention_2": AttentionBackend(
        ("none", "padding_free"),
        _varlen_inputs,
        refusal=_FLASH_REFUSAL,
        requires=("flash_attn", "the flash-attn package (pip install 'clo-fast[gpu]')"),
    ),
    "flash_attention_3": AttentionBackend(("none", "padding_free"), _varlen_inputs, refusal=_FLASH_REFUSAL),
}
