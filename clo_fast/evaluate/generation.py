"""Per model: greedy responses to the prompts, and the teacher-forced NLL of the reference responses."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clo_fast.constants import IGNORE_INDEX
from clo_fast.data.collate import shift_labels
from clo_fast.evaluate.prompts import encode_item
from clo_fast.ops import token_logps


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


@torch.inference_mode()
def generate_responses(
    model, tokenizer, prompt_ids: Sequence[list[int]], *, max_new_tokens: int, batch_size: int
) -> list[dict]:
    """Batched greedy decoding. Prompts are left-padded (with an attention mask) and batched by length.

    Returns, per prompt in input order, `{"text", "tokens", "finished"}`: decoded response (special
    tokens skipped), generated tokens before the first EOS, and whether an EOS was produced.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = _eos_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out: list[dict | None] = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompt_ids[i]
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=eos or None,
        )
        new = gen[:, width:].cpu().tolist()
        for r, i in enumerate(idx):
            toks = new[r]
            stop = next((t for t, tok in enumerate(toks) if tok in eos), None)
            kept = toks if stop is None else toks[:stop]
            out[i] = {
                "text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                "tokens": len(kept),
                "finished": stop is not None,
            }
    return out  # type: ignore[return-value]


def build_reference_batch(examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """Right-padded teacher-forcing batch from (prompt_ids, response_ids) pairs.

    `labels` are shifted (position t holds the token that position t predicts, input_ids[t+1], where
    that token is a response token; IGNORE_INDEX elsewhere), as `clo_fast.ops` expects.
    """
    width = max(len(p) + len(r) for p, r in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    unshifted = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for b, (p, r) in enumerate(examples):
        seq = list(p) + list(r)
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
        unshifted[b, len(p) : len(seq)] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": shift_labels(unshifted)}


def sequence_logprob_sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[S] fp32 sums of log p(labels) under softmax(hidden @ weightᵀ); IGNORE_INDEX positions add 0.

    `clo_fast.ops.sequence_logprobs`: fused on CUDA, chunked torch on CPU (never materialises [S,T,V]).
    """
    from clo_fast.ops import sequence_logprobs

    # never the Triton *interpreter* here (TRITON_INTERPRET=1 in a test session): it is for kernel tests
    impl = "auto" if hidden.is_cuda else "torch"
    return sequence_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX, impl=impl).float()


def _plain_head(model) -> bool:
    """True when logits == last hidden @ lm_head.weightᵀ (no bias, soft-capping or scaling)."""
    c = model.config
    head = model.get_output_embeddings()
    return (
        model.base_model is not model
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and getattr(c, "final_logit_softcapping", None) is None
        and getattr(c, "logit_scale", None) in (None, 1, 1.0)
        and getattr(c, "logits_scaling", None) in (None, 1, 1.0)
    )


def reference_nll(
    model, tokenizer, examples: Sequence[tuple[list[int], list[int]]], *, batch_size: int
) -> tuple[float, int]:
    """Teacher-forced NLL of responses given prompts: (sum of -log p over response tokens, token count).

    `examples` are (prompt_ids, response_ids) with the closing EOS already in response_ids.
    """
    sums, counts = reference_nll_per_sequence(model, tokenizer, examples, batch_size=batch_size)
    return sum(sums), sum(counts)


@torch.inference_mode()
def reference_nll_per_sequence(
    model, tokenizer, examples: Sequence[tuple[list[int], list[int]]], *, batch_size: int
) -> tuple[list[float], list[int]]:
    """`reference_nll` per example: ([-log p summed over its response tokens], [its token count])."""
    device = next(model.parameters()).device
    total: list[float] = []
    count: list[int] = []
    plain = _plain_head(model)
    for s in range(0, len(examples), batch_size):
        batch = build_reference_batch(examples[s : s + batch_size], tokenizer.pad_token_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        if plain:
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            sums = sequence_logprob_sums(hidden, model.get_output_embeddings().weight, labels)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
            sums = token_logps(logits, labels).sum(1)
        total += (-sums.double()).tolist()
        count += (labels != IGNORE_INDEX).sum(1).tolist()
    return total, count


def reference_examples(tokenizer, items: Sequence[dict], data_cfg) -> list[tuple[list[int], list[int]] | None]:
    """(prompt_ids, response_ids + EOS) per item, truncated to data.max_length; None without a reference."""
    out = []
    eos = tokenizer.eos_token_id
    for it in items:
        if it.get("reference") is None:
            out.append(None)
            continue
        p = encode_item(tokenizer, it, data_cfg)
        r = list(tokenizer(it["reference"], add_special_tokens=False)["input_ids"])
        if eos is not None:
            r = r + [eos]
        room = data_cfg.max_length - len(p)
        out.append((p, r[:room]) if room >= 1 and r else None)
    return out
