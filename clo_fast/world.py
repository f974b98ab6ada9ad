"""The miniature fact world's base model: the demo model's tiny Llama (`clo_fast.demo_model.MODEL_SHAPE`, its
tokenizer recipe) pretrained on the world's text (clo_fast/data/world.py) for a few minutes on one CPU thread, so
that it *knows* facts in English and reads Swahili but answers in English: the starting point CLO assumes.

`model.name_or_path: world` in a run config resolves through `ensure_world` to the built (cached) world,
`<data.cache_dir>/world/<fingerprint>/`: base/ (the model), pairs.jsonl and test.jsonl (the fine-tuning pairs and
the test set, for reading), WORLD.json (entities, groups, pretraining losses).

    python -m clo_fast.world [--cache-dir DIR]     # build (or find) it and print its folder
    python -m clo_fast.world --pretrain-steps 300   # a less trained variant (its own cache folder): the base of the
                                                    # comparison's small version that CI re-runs (tests/test_compare.py)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

from clo_fast import numerics
from clo_fast.atomic import build_in_own_process
from clo_fast.constants import DEFAULT_CACHE_DIR
from clo_fast.data.world import (
    SEED,
    WORLD,
    build_entities,
    finetune_pairs,
    pretraining_documents,
    test_items,
    text_fingerprint,
)
from clo_fast.logs import add_log_level_argument, get_logger, setup_logging

log = get_logger("world")

RECIPE_VERSION = 1  # bump when the recipe below changes
# pretraining of the base (all parameters, causal LM, single thread; ~3 M tokens, ~90 passes over the corpus)
PRETRAIN = {
    "steps": 1500,
    "batch": 16,
    "block": 128,
    "lr": 3e-3,
    "warmup_steps": 30,
    "vocab_size": 1024,
}


def world_fingerprint(pretrain_steps: int = PRETRAIN["steps"]) -> str:
    from clo_fast.demo_model import CHAT_TEMPLATE, MODEL_SHAPE

    blob = {
        "v": RECIPE_VERSION,
        "text": text_fingerprint(),
        "pretrain": {**PRETRAIN, "steps": pretrain_steps},
        "shape": MODEL_SHAPE,
        "template": CHAT_TEMPLATE,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def world_dir(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, pretrain_steps: int = PRETRAIN["steps"]) -> Path:
    """Named by the recipe and the CPU numerics it is built under (clo_fast.numerics), as the demo model is."""
    mode, _ = numerics.decide()
    return Path(os.path.expanduser(str(cache_dir))) / "world" / f"{world_fingerprint(pretrain_steps)}-{mode}"


def pretrain(model, tokenizer, docs: dict[str, list[str]], steps: int = PRETRAIN["steps"]) -> list[float]:
    """Deterministic causal-LM pretraining: shuffled passes over every document (each ends in EOS), concatenated
    and cut into block-token rows; linear warmup, cosine decay; one thread. Returns the per-step losses."""
    import torch

    texts = [t for kind in docs for t in docs[kind]]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    g = torch.Generator().manual_seed(SEED)
    B, L = PRETRAIN["batch"], PRETRAIN["block"]
    stream: list[int] = []
    while len(stream) < steps * B * L:
        for i in torch.randperm(len(rows), generator=g).tolist():
            stream.extend(rows[i])
    data = torch.tensor(stream[: steps * B * L]).view(steps, B, L)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible CPU reductions
    losses = []
    try:
        model.train()
        for step in range(steps):
            warm = PRETRAIN["warmup_steps"]
            f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = PRETRAIN["lr"] * f
            loss = model(input_ids=data[step], labels=data[step]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % 250 == 0:
                log.info(f"pretraining step {step}/{steps}: loss {losses[-1]:.3f}")
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return losses


def build_world(out_dir: str | os.PathLike, pretrain_steps: int = PRETRAIN["steps"]) -> Path:
    """Entities, texts, tokenizer and pretrained base (`pretrain_steps` steps of the recipe) into out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from clo_fast.demo_model import MODEL_SHAPE, train_tokenizer

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entities = build_entities()
    docs = pretraining_documents(entities)
    pairs = finetune_pairs(entities)
    items = test_items(entities)
    texts = [t for kind in docs for t in docs[kind]] + [p[k] for p in pairs for k in p if k != "id"]
    tokenizer = train_tokenizer(sorted(texts), vocab_size=PRETRAIN["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    torch.random.set_rng_state(rng_state)
    losses = pretrain(model, tokenizer, docs, pretrain_steps)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    for name, recs in (("pairs.jsonl", pairs), ("test.jsonl", items)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    (out / "WORLD.json").write_text(
        json.dumps(
            {
                "recipe_version": RECIPE_VERSION,
                "fingerprint": world_fingerprint(pretrain_steps),
                "entities": entities,
                "groups": {k: v for k, v in WORLD.items() if k != "entities"},
                "documents": {k: len(v) for k, v in docs.items()},
                "pairs": len(pairs),
                "test_items": len(items),
                "parameters": sum(p.numel() for p in model.parameters()),
                "pretrain": {**PRETRAIN, "steps": pretrain_steps},
                "pretrain_tokens": pretrain_steps * PRETRAIN["batch"] * PRETRAIN["block"],
                "pretrain_loss_first_last": losses[:1] + losses[-1:],
                "build_seconds": round(time.time() - t0, 1),
            },
            indent=1,
        )
    )
    return out


def ensure_world(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, pretrain_steps: int = PRETRAIN["steps"]) -> Path:
    """The built world's folder under cache_dir, building it first if needed (safe across processes)."""
    final = world_dir(cache_dir, pretrain_steps)
    if (final / "base" / "config.json").is_file():
        return final
    log.info(f"building the miniature world and its base model into {final} (a few minutes)")
    extra = () if pretrain_steps == PRETRAIN["steps"] else ("--pretrain-steps", str(pretrain_steps))
    return build_in_own_process(final, "model_cache", "clo_fast.world", "the world's base", extra)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="build into this new directory instead of the cache (the cache's builder uses it)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=PRETRAIN["steps"],
        help=f"pretraining steps of the base (default {PRETRAIN['steps']}, the README's world; fewer: a base that "
        "knows less, in a cache folder of its own, e.g. 300 for the comparison's small version)",
    )
    add_log_level_argument(p)
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    if not 1 <= a.pretrain_steps <= 100_000:
        p.error(f"--pretrain-steps: must be in [1, 100000], got {a.pretrain_steps}")
    print(build_world(a.out, a.pretrain_steps) if a.out else ensure_world(a.cache_dir, a.pretrain_steps))


if __name__ == "__main__":
    main()
