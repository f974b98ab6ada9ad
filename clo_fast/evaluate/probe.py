"""Language fidelity during training (train.fidelity_prompts > 0), called by the trainer (clo_fast/train.py) every
eval_steps: greedy responses to a few held-out prompts per language, their detected language, the reference NLL
per token, and a few samples — the functions of `clo_fast.evaluate`, run on the model being trained.

Under ZeRO-3 every rank runs the same prompts: the backbone's parameters are gathered by DeepSpeed's hooks in
each forward (collectively, so generation uses transformers' synced_gpus, which it turns on by itself under
ZeRO-3); the LM head's weight is gathered per call (see `_head_gathered_per_call`).
"""

from __future__ import annotations

import contextlib

import torch

from clo_fast.config import RunConfig, target_languages


class FidelityProbe:
    """Callable: probe(policy) -> {"fidelity/<lang>", "ref_nll/<lang>", "samples/<lang>" (text)} for the CLOPolicy
    being trained (engine.module): generation through its causal LM, the NLL through its fused head."""

    def __init__(self, cfg: RunConfig, tokenizer, records: list[dict]):
        from clo_fast.evaluate.generation import reference_examples
        from clo_fast.evaluate.prompts import encode_item, normalize_prompts
        from clo_fast.language_id import get_identifier

        self.cfg, self.tokenizer = cfg, tokenizer
        # every target language of the run (data.target_langs): fidelity/<lang> for each
        self.items = normalize_prompts(records, target_languages(cfg.data), cfg.train.fidelity_prompts)
        self.langs = list(dict.fromkeys(it["lang"] for it in self.items))
        self.lid = get_identifier(self.langs, cfg.eval.detector_languages)
        self.prompt_ids = [encode_item(tokenizer, it, cfg.data) for it in self.items]
        self.references = reference_examples(tokenizer, self.items, cfg.data)

    @torch.no_grad()
    def __call__(self, policy) -> dict:
        from clo_fast.evaluate.generation import generate_responses
        from clo_fast.evaluate.report import response_metrics
        from clo_fast.model import causal_lm

        ev, k = self.cfg.eval, self.cfg.train.fidelity_samples
        lm = causal_lm(policy)
        was_training = policy.training
        policy.eval()
        lm.eval()
        try:
            with _head_gathered_per_call(lm):
                gens = generate_responses(
                    lm, self.tokenizer, self.prompt_ids, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size
                )
            nll = {lang: self._reference_nll(policy, lang) for lang in self.langs}
        finally:
            policy.train(was_training)
            lm.train(was_training)
        detected = self.lid.detect_batch([g["text"] for g in gens])
        per_lang = response_metrics(self.items, gens, detected)
        out: dict = {}
        for lang in self.langs:
            out[f"fidelity/{lang}"] = per_lang[lang]["fidelity"]
            if per_lang[lang]["chrf"] is not None:
                out[f"chrf/{lang}"] = per_lang[lang]["chrf"]
            if nll[lang] is not None:
                out[f"ref_nll/{lang}"] = nll[lang]
            shown = [i for i, it in enumerate(self.items) if it["lang"] == lang][:k]
            out[f"samples/{lang}"] = "\n\n".join(
                f"[{detected[i] or '?'}] {self.items[i]['prompt']}\n→ {gens[i]['text']}" for i in shown
            )
        return out

    def _reference_nll(self, policy, lang: str) -> float | None:
        """Per-token NLL of the reference responses through the policy's fused head, which reads the head weight
        inside its own forward (ZeRO-3 gathers it there)."""
        from clo_fast.constants import IGNORE_INDEX
        from clo_fast.evaluate.generation import build_reference_batch

        ex = [r for it, r in zip(self.items, self.references, strict=True) if it["lang"] == lang and r]
        if not ex:
            return None
        device = next(policy.parameters()).device
        total, count = 0.0, 0
        for s in range(0, len(ex), self.cfg.eval.batch_size):
            batch = build_reference_batch(ex[s : s + self.cfg.eval.batch_size], self.tokenizer.pad_token_id)
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            total -= float(policy(ids, mask, labels).double().sum())
            count += int((labels != IGNORE_INDEX).sum())
        return total / count if count else None


@contextlib.contextmanager
def _head_gathered_per_call(causal_lm):
    """Under ZeRO-3 the causal LM's head module is outside the engine's module tree, so no hook gathers its weight;
    each call gathers it for its own duration (a gather around the whole generation would not do: with tied
    embeddings the embedding module's hooks release the shared weight after every forward). No-op without ZeRO-3."""
    head = causal_lm.get_output_embeddings()
    if not hasattr(head.weight, "ds_id"):
        yield
        return
    import deepspeed

    plain_forward = head.forward

    def gathered_forward(hidden):
        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
            return plain_forward(hidden)

    head.forward = gathered_forward
    try:
        yield
    finally:
        del head.forward  # back to the class's forward
