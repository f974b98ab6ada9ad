"""Packed CLO micro-batches: the body sees each needed token once, the head sees only labelled rows.

A CLO example holds four sequences, row 4b+k = example b, sequence k:
    0: [x_en | y_en]   1: [x_en | y_tgt]   2: [x_tgt | y_tgt]   3: [x_tgt | y_en]
Three layouts (`train.packing`), all giving per-sequence sums equal to the padded path's:

  none           the padded [4B, T] batch of `collate_clo`; only the labelled rows go through the head
                 (`head_rows` index the flattened [4B·T] hidden rows).
  padding_free   the 4B sequences concatenated into one stream [1, L], L = Σ (n_s − 1); position ids restart
                 at 0 for every sequence, attention is confined to each sequence.
  prefix_shared  per example two documents, [x_en | y_en | y_tgt] and [x_tgt | y_tgt | y_en]: each prompt
                 once. A response attends to its prompt and (causally) to itself, never to the other
                 response; the second response's position ids continue from the prompt's end, as if it
                 followed the prompt directly. L = Σ_b (|x_en| + |x_tgt| + 2|y_en| + 2|y_tgt| − 4).

Why the outputs are exact: a token's hidden state depends only on the tokens it attends to and on the
positions (RoPE) of those tokens; each layout gives every token the same visible set, with the same
position ids, as it has in its own padded row. The last prompt position of a shared prompt predicts the
first token of *both* responses: its hidden row appears twice in `head_rows`, with two labels and two
sequence ids (the head's backward index-adds both gradients into that one row).

Cost per example (n_k = length of sequence k, T = the padded length):
  body tokens   none 4T,  padding_free Σ_k (n_k − 1),  prefix_shared Σ_k (n_k − 1) − |x_en| − |x_tgt|
                (a sequence's last token is only a label, never an input: see `_documents`)
  head rows     exactly the labelled rows in every mode: Σ_k |y_k| (position t predicts token t+1, so the
                last prompt position predicts the first response token and the response's last token, EOS,
                predicts nothing) — vs 4T rows through the head when the padded batch goes through whole
  attention     none Σ_s T², packed Σ_documents n² with block-sparse kernels (flex, flash varlen) but L²
                with a dense sdpa mask — keep `token_budget` moderate (a few thousand) with sdpa. Measured
                on an H200 at a Llama-3.2-1B shape, budget 4096: sdpa's dense mask was not the bottleneck
                (flex_attention was no faster); the per-micro-batch cost is.

Everything here that looks at token values runs on the host, where batches are made: the step itself
only indexes with the precomputed `head_rows` (no device synchronisation, no data-dependent shapes).

    batch = build_packed_batch(examples, "prefix_shared", pad_token_id)   # host, CPU tensors
    batch = batch.to(device)
    logps = policy(batch)                       # [4B] fp32, same as policy(ids, mask, labels) padded
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100
PACKING_MODES = ("none", "padding_free", "prefix_shared")
# pairs of sequences that share a prompt: (0: x_en+y_en, 1: x_en+y_tgt), (2: x_tgt+y_tgt, 3: x_tgt+y_en)
SHARED_PROMPT_PAIRS = ((0, 1), (2, 3))
ALL_SEQUENCES = (0, 1, 2, 3)

# branch ids: which part of a document a token is in. A token attends to earlier tokens of its document
# whose branch is PROMPT or its own branch.
PROMPT, FIRST_RESPONSE, SECOND_RESPONSE = 0, 1, 2

_ATTN_DENSE = ("sdpa", "eager")
_ATTN_FLASH = ("flash_attention_2", "flash_attention_3")


class PackingError(ValueError):
    """An unsupported packing / attention-backend / device combination (a start-up configuration error)."""


# ------------------------------------------------------------------------------------ the batch
@dataclass
class PackedBatch:
    """One micro-batch in one of the layouts above (tensors on the host until `.to(device)`).

    input_ids     [1, L] (packed) or [4B, T] (none)
    position_ids  [1, L] (packed) or None (none: HF makes 0..T-1)
    attention_mask  [4B, T] padding mask (none) or None (packed)
    doc_ids       [L] int64: the document each packed token belongs to (padding tail: its own document)
    branch_ids    [L] int64: PROMPT / FIRST_RESPONSE / SECOND_RESPONSE (all PROMPT in padding_free)
    cu_seqlens    [D+1] int32 document boundaries (padding_free only: flash varlen), max_seqlen its longest
    head_rows     [N] int64 rows of the flattened hidden states [L or 4B·T, H] that carry a label
                  (duplicates allowed: the shared last prompt position)
    head_labels   [N] int64 the token each of those rows predicts
    head_seq_ids  [N] int64 the sequence (4b+k) each row's log-prob adds to
    response_tokens [B, 4] labelled tokens per sequence (for the loss's global denominators)
    ref_logps     [B, 4] float32 when every example carries one
    languages     [B] int64 each example's language, set by the trainer's MicroBatcher (data.target_langs)
    body_tokens   tokens the backbone processes (L, or 4B·T); real_tokens: those that are not padding
    windows       consecutive documents grouped into spans of ≤ `attention_window` tokens (host ints): sdpa
                  attends within each span only, so attention costs Σ span² instead of L²
    """

    mode: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    doc_ids: torch.Tensor | None
    branch_ids: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    head_rows: torch.Tensor
    head_labels: torch.Tensor
    head_seq_ids: torch.Tensor
    num_seqs: int
    response_tokens: torch.Tensor
    ref_logps: torch.Tensor | None
    num_examples: int
    body_tokens: int
    real_tokens: int
    windows: tuple[tuple[int, int], ...] | None = None  # document-aligned [start, end) spans for sdpa
    languages: torch.Tensor | None = None  # [B] int64: each example's target language (index into the run's list)

    @property
    def head_row_count(self) -> int:
        return int(self.head_rows.numel())

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        """A copy with every tensor on `device` (ints stay host ints: nothing is read back)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                if device is not None and torch.device(device).type == "cuda" and v.device.type == "cpu":
                    v = v.pin_memory() if torch.cuda.is_available() else v
                moved[f.name] = v.to(device, non_blocking=non_blocking)
        return replace(self, **moved)


# --------------------------------------------------------------------------------- host building
def _prompt_length(labels: Sequence[int]) -> int:
    """Index of the first labelled token (the prompt is everything before it)."""
    for t, v in enumerate(labels):
        if v != IGNORE_INDEX:
            return t
    return len(labels)


def _check_example(b: int, ex: dict) -> None:
    if len(ex["input_ids"]) != 4 or len(ex["labels"]) != 4:
        raise ValueError(f"packing: example {b} must hold 4 sequences, got {len(ex['input_ids'])}")
    for k in range(4):
        if len(ex["input_ids"][k]) != len(ex["labels"][k]):
            raise ValueError(f"packing: example {b} sequence {k}: input_ids and labels lengths differ")
        if len(ex["input_ids"][k]) == 0:
            raise ValueError(f"packing: example {b} sequence {k} is empty")


def _shares_prompt(ex: dict, k1: int, k2: int) -> int:
    """The shared prompt length of sequences k1 and k2, or 0 when they do not start with the same prompt
    (then the pair is laid out as two separate documents, which is still exact)."""
    ids1, ids2 = ex["input_ids"][k1], ex["input_ids"][k2]
    p1, p2 = _prompt_length(ex["labels"][k1]), _prompt_length(ex["labels"][k2])
    if p1 != p2 or p1 == 0 or p1 >= len(ids1) or p2 >= len(ids2) or list(ids1[:p1]) != list(ids2[:p2]):
        return 0
    return p1


def _documents(ex: dict, mode: str, sequences: Sequence[int]) -> list[tuple[list[int], list[int], list[int], dict]]:
    """The documents of one example: (token ids, position ids, branch ids, {k: where}) — sequence k's
    position t sits at document index where[k][t].

    A sequence's last token (the response's EOS) is only ever a label: its hidden row predicts nothing and
    no later token of the layout attends to it, so it is not an input here (one body token less per
    sequence, exactly the same sums).
    """
    docs = []
    todo = [k for k in ALL_SEQUENCES if k in sequences]
    if mode == "prefix_shared":
        for k1, k2 in SHARED_PROMPT_PAIRS:
            if k1 not in todo or k2 not in todo:
                continue
            p = _shares_prompt(ex, k1, k2)
            if p == 0:
                continue
            ids1, ids2 = list(ex["input_ids"][k1])[:-1], list(ex["input_ids"][k2])[:-1]
            n1, n2 = len(ids1), len(ids2)  # inputs: p ≤ n1, n2 since each response has ≥ 1 token
            ids = ids1 + ids2[p:]
            pos = list(range(n1)) + list(range(p, n2))  # the second response continues from the prompt's end
            branch = [PROMPT] * p + [FIRST_RESPONSE] * (n1 - p) + [SECOND_RESPONSE] * (n2 - p)
            where = {k1: list(range(n1)), k2: list(range(p)) + list(range(n1, n1 + n2 - p))}
            docs.append((ids, pos, branch, where))
            todo.remove(k1)
            todo.remove(k2)
    for k in todo:  # padding_free, or a pair without a shared prompt
        ids = list(ex["input_ids"][k])[:-1]
        n = len(ids)
        if n:
            docs.append((ids, list(range(n)), [PROMPT] * n, {k: list(range(n))}))
    return docs


def packed_length(example: dict, mode: str, sequences: Sequence[int] = ALL_SEQUENCES) -> int:
    """Body tokens of one example in a packed layout (what the token budget counts)."""
    if mode == "none":
        return sum(len(example["input_ids"][k]) for k in sequences)
    return sum(len(d[0]) for d in _documents(example, mode, sequences))


def _ref_logps(examples: Sequence[dict]) -> torch.Tensor | None:
    if all(ex.get("ref_logps") is not None for ex in examples):
        return torch.tensor([list(ex["ref_logps"]) for ex in examples], dtype=torch.float32)
    return None


def _group_windows(bounds: list[int], attention_window: int) -> tuple[tuple[int, int], ...]:
    """Consecutive documents (boundaries `bounds`) grouped greedily into spans of ≤ attention_window tokens;
    a longer document is a span of its own. Attention never crosses a document, so never a span."""
    spans = []
    start = bounds[0]
    for i in range(1, len(bounds)):
        if bounds[i] - start > attention_window and bounds[i - 1] > start:
            spans.append((start, bounds[i - 1]))
            start = bounds[i - 1]
    if bounds[-1] > start:
        spans.append((start, bounds[-1]))
    return tuple(spans)


def build_packed_batch(
    examples: Sequence[dict],
    mode: str,
    pad_token_id: int,
    *,
    pad_to_multiple_of: int = 1,
    sequences: Sequence[int] = ALL_SEQUENCES,
    attention_window: int = 128,
) -> PackedBatch:
    """Pack tokenized CLO examples (`input_ids`/`labels`: 4 lists each, labels unshifted, -100 on the
    prompt; optional `ref_logps`) into one micro-batch in layout `mode`.

    `pad_to_multiple_of` rounds the stream length up (fewer distinct shapes for compiled kernels); the tail
    is a document of its own with no head rows. `sequences` restricts the batch to some of the four
    sequences (SFT-only runs): the others get no rows and sum to 0. `attention_window`: documents are
    grouped into sdpa spans of up to this many tokens (cost Σ span² + one call per span; a longer document
    is its own span). At the demo shape on CPU, where documents are ~90-130 tokens, windows of 1-128 measured
    the same within noise once the spans were cut with one split (see `_windowed_sdpa_forward`); 256 and up
    were slower (Σ span² grows).
    Cost: O(total tokens) Python work on the host.
    """
    if mode not in PACKING_MODES:
        raise PackingError(f"train.packing must be one of {'|'.join(PACKING_MODES)}, got {mode!r}")
    if not examples:
        raise ValueError("packing: empty batch")
    for b, ex in enumerate(examples):
        _check_example(b, ex)
    if mode == "none":
        return build_padded_batch(examples, pad_token_id, pad_to_multiple_of=pad_to_multiple_of, sequences=sequences)

    ids_all: list[int] = []
    pos_all: list[int] = []
    branch_all: list[int] = []
    doc_all: list[int] = []
    bounds = [0]
    rows: list[int] = []
    row_labels: list[int] = []
    row_seqs: list[int] = []
    counts = [[0] * 4 for _ in examples]  # labelled tokens per sequence (host ints; one tensor at the end)
    ndoc = 0
    for b, ex in enumerate(examples):
        for ids, pos, branch, where in _documents(ex, mode, sequences):
            off = len(ids_all)
            ids_all += ids
            pos_all += pos
            branch_all += branch
            doc_all += [ndoc] * len(ids)
            ndoc += 1
            bounds.append(len(ids_all))
            for k, place in where.items():
                lab = ex["labels"][k]
                # position t predicts token t+1 (the shift collate_clo does on the padded labels)
                ts = [t for t in range(len(lab) - 1) if lab[t + 1] != IGNORE_INDEX]
                rows += [off + place[t] for t in ts]
                row_labels += [int(lab[t + 1]) for t in ts]
                row_seqs += [4 * b + k] * len(ts)
                counts[b][k] += len(ts)
    response_tokens = torch.tensor(counts, dtype=torch.long).view(len(examples), 4)
    real = len(ids_all)
    m = max(1, int(pad_to_multiple_of or 1))
    pad = -real % m
    if pad:  # a document of its own: attends only to itself, no head rows
        ids_all += [int(pad_token_id)] * pad
        pos_all += list(range(pad))
        branch_all += [PROMPT] * pad
        doc_all += [ndoc] * pad
        bounds.append(len(ids_all))
    L = len(ids_all)
    cu = torch.tensor(bounds, dtype=torch.int32)
    lens = cu[1:] - cu[:-1]
    return PackedBatch(
        mode=mode,
        input_ids=torch.tensor(ids_all, dtype=torch.long).view(1, L),
        position_ids=torch.tensor(pos_all, dtype=torch.long).view(1, L),
        attention_mask=None,
        doc_ids=torch.tensor(doc_all, dtype=torch.long),
        branch_ids=torch.tensor(branch_all, dtype=torch.long),
        cu_seqlens=cu if mode == "padding_free" else None,
        max_seqlen=int(lens.max()),
        head_rows=torch.tensor(rows, dtype=torch.long),
        head_labels=torch.tensor(row_labels, dtype=torch.long),
        head_seq_ids=torch.tensor(row_seqs, dtype=torch.long),
        num_seqs=4 * len(examples),
        response_tokens=response_tokens,
        ref_logps=_ref_logps(examples),
        num_examples=len(examples),
        body_tokens=L,
        real_tokens=real,
        windows=_group_windows(bounds, attention_window),
    )


def build_padded_batch(
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int = 64,
    sequences: Sequence[int] = ALL_SEQUENCES,
) -> PackedBatch:
    """Mode `none`: the padded batch of `collate_clo`, plus the labelled-row indices (built here, on the
    host), so that only labelled rows go through the head. With `sequences` ⊂ {0..3} only those rows of
    each example are kept (input rows in order b-major), their sequence ids still 4b+k."""
    from clo_fast.data import collate_clo

    padded = collate_clo(examples, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    keep = sorted(set(sequences))
    ids, mask, labels = padded["input_ids"], padded["attention_mask"], padded["labels"]
    seq_of_row = torch.arange(ids.shape[0])
    if keep != list(ALL_SEQUENCES):
        sel = (torch.arange(len(examples))[:, None] * 4 + torch.tensor(keep)).reshape(-1)
        ids, mask, labels, seq_of_row = ids[sel], mask[sel], labels[sel], seq_of_row[sel]
    T = ids.shape[1]
    flat = labels.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # host tensor: no device sync
    response_tokens = padded["response_tokens"].clone()
    if keep != list(ALL_SEQUENCES):
        dropped = [k for k in ALL_SEQUENCES if k not in keep]
        response_tokens[:, dropped] = 0
    return PackedBatch(
        mode="none",
        input_ids=ids,
        position_ids=None,
        attention_mask=mask,
        doc_ids=None,
        branch_ids=None,
        cu_seqlens=None,
        max_seqlen=T,
        head_rows=rows,
        head_labels=flat[rows],
        head_seq_ids=seq_of_row[rows // T],
        num_seqs=4 * len(examples),
        response_tokens=response_tokens,
        ref_logps=padded.get("ref_logps"),
        num_examples=len(examples),
        body_tokens=int(ids.numel()),
        real_tokens=int(mask.sum()),
    )


# ------------------------------------------------------------------------------ micro-batching
def plan_micro_batches(
    examples: Sequence[dict],
    mode: str,
    token_budget: int,
    *,
    pad_to_multiple_of: int = 64,
    max_examples: int | None = None,
    sequences: Sequence[int] = ALL_SEQUENCES,
) -> list[list[int]]:
    """Group example indices, in order, into micro-batches whose body tokens stay ≤ `token_budget`.

    Body tokens: the packed length for padding_free / prefix_shared; 4·B·T (T = longest sequence rounded up
    to `pad_to_multiple_of`) for none. An example larger than the budget on its own gets a micro-batch of
    its own. Greedy in order (the sampler's shuffle is kept). The loss's denominators are global (sum of
    `response_tokens` and of `num_examples` over every micro-batch of the step and every rank), so
    micro-batches of different sizes are weighted exactly.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    m = max(1, int(pad_to_multiple_of or 1))

    def cost(group: list[int]) -> int:
        if mode == "none":
            longest = max(len(examples[i]["input_ids"][k]) for i in group for k in sequences)
            return len(sequences) * len(group) * (-(-longest // m) * m)
        return sum(sizes[i] for i in group)

    sizes = [0 if mode == "none" else packed_length(ex, mode, sequences) for ex in examples]
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in range(len(examples)):
        full = max_examples is not None and len(cur) >= max_examples
        if cur and (full or cost(cur + [i]) > token_budget):
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def balance_micro_batches(
    examples: Sequence[dict], mode: str, num_micro_batches: int, *, sequences: Sequence[int] = ALL_SEQUENCES
) -> list[list[int]]:
    """Split example indices into exactly `num_micro_batches` groups of near-equal body tokens.

    Why a fixed count: under ZeRO-3 every rank must run the same number of forwards in a step (parameters
    are gathered collectively) and DeepSpeed's accumulation boundary counts micro-batches. With a token
    budget, take G = max over ranks of len(plan_micro_batches(...)) (one all_reduce(MAX) of a host int per
    step), then balance each rank's examples into G groups here. Longest-first onto the lightest group
    (LPT: the heaviest group is ≤ 4/3 of the optimum); indices ascend within a group. A group is empty only
    when there are fewer examples than groups (the caller then runs a zero-loss forward, or lowers G).
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    size = [packed_length(ex, mode if mode != "none" else "padding_free", sequences) for ex in examples]
    groups: list[list[int]] = [[] for _ in range(num_micro_batches)]
    load = [0] * num_micro_batches
    for i in sorted(range(len(examples)), key=lambda i: (-size[i], i)):
        g = min(range(num_micro_batches), key=lambda j: (load[j], j))
        groups[g].append(i)
        load[g] += size[i]
    return [sorted(g) for g in groups]


# ------------------------------------------------------------------------------------ attention
def supported_packing(attn_implementation: str, device_type: str) -> tuple[str, ...]:
    """Packing modes that are exact with this attention backend on this device type.

    sdpa / eager: every mode (a dense [1,1,L,L] mask; attention cost L² — keep the token budget moderate).
    flex_attention: every mode on CUDA (a block-sparse BlockMask); on CPU torch has no flex backward.
    flash_attention_2/3: none and padding_free (variable-length kernel over cu_seqlens); prefix_shared needs
    the second response to skip the first, which a contiguous varlen segment cannot express.
    """
    if attn_implementation in _ATTN_DENSE:
        return ("none", "padding_free", "prefix_shared")
    if attn_implementation == "flex_attention":
        return ("none", "padding_free", "prefix_shared") if device_type != "cpu" else ("none",)
    if attn_implementation in _ATTN_FLASH:
        return ("none", "padding_free")
    return ("none",)


def default_packing(attn_implementation: str, device_type: str) -> str:
    """The fastest exact mode the backend supports: prefix_shared > padding_free > none."""
    ok = supported_packing(attn_implementation, device_type)
    for mode in ("prefix_shared", "padding_free", "none"):
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
    if attn_implementation in _ATTN_FLASH and mode == "prefix_shared":
        why = (
            "flash attention's variable-length kernel attends to one contiguous segment per token, but in "
            "prefix_shared the second response must see its prompt and skip the first response"
        )
        fix = (
            "use train.packing: padding_free with flash_attention_2, "
            "or model.attn_implementation: flex_attention / sdpa"
        )
    elif attn_implementation == "flex_attention" and device_type == "cpu":
        why = "torch's flex_attention has no backward on CPU"
        fix = "use model.attn_implementation: sdpa on CPU (every packing mode works with it)"
    else:
        why = f"attention backend {attn_implementation!r} has no packed-sequence mask support here"
        fix = "use model.attn_implementation: sdpa or flex_attention, or train.packing: none"
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

    The spans tile [0, L) in order (`_group_windows`), so q/k/v are cut with one `split` each: its backward
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


def attention_inputs(batch: PackedBatch, attn_implementation: str, dtype: torch.dtype = torch.float32) -> dict:
    """Backbone keyword arguments that confine attention as the batch's layout needs.

    A prepared 4D mask / BlockMask makes transformers use it as given (no mask building, no packed-sequence
    detection from position ids). Flash attention gets the host-made cu_seqlens and max length, so its
    layers do not derive them from position ids; transformers' mask preparation still reads the position
    ids once per forward to detect packing (one host sync per forward with flash_attention_2).
    """
    if batch.mode == "none":
        return {"attention_mask": batch.attention_mask}
    device_type = batch.input_ids.device.type
    check_packing(batch.mode, attn_implementation, device_type)
    if attn_implementation in _ATTN_FLASH:
        cu = batch.cu_seqlens
        return {
            "attention_mask": None,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": batch.max_seqlen,
            "max_length_k": batch.max_seqlen,
        }
    if attn_implementation == "flex_attention":
        return {"attention_mask": flex_block_mask(batch.doc_ids, batch.branch_ids)}
    if attn_implementation == "sdpa" and batch.windows is not None:
        register_packed_sdpa()
        return {
            "attention_mask": windowed_packed_mask(batch.doc_ids, batch.branch_ids, batch.windows),
            "clo_windows": batch.windows,
        }
    mask = dense_packed_mask(batch.doc_ids, batch.branch_ids)
    if attn_implementation == "eager":  # eager adds the mask to the scores
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return {"attention_mask": torch.where(mask, zero, torch.finfo(dtype).min)}
    return {"attention_mask": mask}


# ------------------------------------------------------------------------------------- forward
def attn_implementation_of(policy) -> str:
    """The model's attention backend ("clo_packed_sdpa" is sdpa: `use_packed_sdpa`)."""
    cfg = getattr(policy, "config", None)
    attn = getattr(cfg, "_attn_implementation", None) or "sdpa"
    return "sdpa" if attn == PACKED_SDPA else attn


def backbone_hidden_rows(policy, batch: PackedBatch, attn_implementation: str | None = None) -> torch.Tensor:
    """Run the backbone once on the batch: hidden states flattened to [L or 4B·T, H]."""
    attn = attn_implementation or attn_implementation_of(policy)
    param = next(policy.model.parameters())
    kwargs = attention_inputs(batch, attn, dtype=param.dtype if param.is_floating_point() else torch.float32)
    if "clo_windows" in kwargs:
        use_packed_sdpa(policy.model)
    out = policy.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.reshape(-1, hidden.shape[-1])


def packed_sequence_logps(policy, batch: PackedBatch, attn_implementation: str | None = None) -> torch.Tensor:
    """Per-sequence log-prob sums [4B] fp32 (row 4b+k = example b, sequence k) from one backbone pass and a
    head pass over exactly the labelled rows: hidden[head_rows] → FusedLogprobHead (rows gathered inside
    the head module's forward, where ZeRO-3 has gathered its weight)."""
    hidden = backbone_hidden_rows(policy, batch, attn_implementation)
    return policy.lm_head(
        hidden, batch.head_labels, rows=batch.head_rows, seq_ids=batch.head_seq_ids, num_seqs=batch.num_seqs
    )
