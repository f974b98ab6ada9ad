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

from clo_fast.attention import FIRST_RESPONSE, PROMPT, SECOND_RESPONSE, PackingError
from clo_fast.constants import IGNORE_INDEX, PACKING_MODES

# pairs of sequences that share a prompt: (0: x_en+y_en, 1: x_en+y_tgt), (2: x_tgt+y_tgt, 3: x_tgt+y_en)
SHARED_PROMPT_PAIRS = ((0, 1), (2, 3))
ALL_SEQUENCES = (0, 1, 2, 3)


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
    micro-batches of different sizes are weighted exactly. The trainer balances a fixed count instead
    (`balance_micro_batches`); benchmarks/bench_step.py --split budget measures this grouping.
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
