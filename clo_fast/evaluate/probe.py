"""Language fidelity during training (train.fidelity_prompts > 0), called by the trainer (clo_fast/train.py) every
eval_steps: greedy responses to a few held-out prompts per language, their detected language, the reference NLL
per token, and a few samples — the functions of `clo_fast.evaluate`, run on the model being trained.

Under ZeRO-3 every rank runs the same prompts: the backbone's parameters are gathered by DeepSpeed's hooks in
each forward (collectively, so generation uses transformers' synced_gpus, which it turns on by itself under
ZeRO-3), and the LM head's weight, which the causal-LM head module reads outside the engine's module tree, is
gathered around the probe.
"""

from __future__ import annotations

import contextlib

import torch

from clo_fast.config import RunConfig


class FidelityProbe:
    """Callable: probe(causal_lm) -> {"fidelity/<lang>", "ref_nll/<lang>", "samples/<lang>" (text)}."""

    def __init__(self, cfg: RunConfig, tokenizer, records: list[dict]):
        from clo_fast.evaluate.generation import reference_examples
        from clo_fast.evaluate.prompts import encode_prompt, normalize_prompts
        from clo_fast.language_id import get_identifier

        self.cfg, self.tokenizer = cfg, tokenizer
        self.items = normalize_prompts(records, cfg.data.target_lang, cfg.train.fidelity_prompts)
        self.langs = list(dict.fromkeys(it["lang"] for it in self.items))
        self.lid = get_identifier(self.langs, cfg.eval.detector_languages)
        self.prompt_ids = [encode_prompt(tokenizer, it["prompt"], cfg.data) for it in self.items]
        self.references = reference_examples(tokenizer, self.items, cfg.data)

    @torch.no_grad()
    def __call__(self, causal_lm) -> dict:
        from clo_fast.evaluate.generation import generate_responses, reference_nll
        from clo_fast.evaluate.report import response_metrics

        ev, k = self.cfg.eval, self.cfg.train.fidelity_samples
        was_training = causal_lm.training
        causal_lm.eval()
        try:
            with _gathered_head(causal_lm):
                gens = generate_responses(
                    causal_lm,
                    self.tokenizer,
                    self.prompt_ids,
                    max_new_tokens=ev.max_new_tokens,
                    batch_size=ev.batch_size,
                )
                nll = {}
                for lang in self.langs:
                    ex = [r for it, r in zip(self.items, self.references, strict=True) if it["lang"] == lang and r]
                    nll[lang] = reference_nll(causal_lm, self.tokenizer, ex, batch_size=ev.batch_size) if ex else None
        finally:
            causal_lm.train(was_training)
        detected = self.lid.detect_batch([g["text"] for g in gens])
        per_lang = response_metrics(self.items, gens, detected)
        out: dict = {}
        for lang in self.langs:
            out[f"fidelity/{lang}"] = per_lang[lang]["fidelity"]
            if nll[lang] is not None and nll[lang][1]:
                out[f"ref_nll/{lang}"] = nll[lang][0] / nll[lang][1]
            shown = [i for i, it in enumerate(self.items) if it["lang"] == lang][:k]
            out[f"samples/{lang}"] = "\n\n".join(
                f"[{detected[i] or '?'}] {self.items[i]['prompt']}\n→ {gens[i]['text']}" for i in shown
            )
        return out


@contextlib.contextmanager
def _gathered_head(causal_lm):
    """The output-embedding weight gathered in full for the probe (a no-op without ZeRO-3)."""
    weight = causal_lm.get_output_embeddings().weight
    if not hasattr(weight, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield
