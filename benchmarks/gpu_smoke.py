"""GPU smoke training: the trainer end to end under DeepSpeed on one GPU (bf16, ZeRO-3, Triton head).

    python benchmarks/gpu_smoke.py build outputs/gpu_smoke/model           # random Llama-3.2-1B-shaped model
    deepspeed --num_gpus 1 clo_fast/train.py --config configs/gpu_smoke.yaml                # 20 steps
    deepspeed --num_gpus 1 clo_fast/train.py --config configs/gpu_smoke.yaml --resume --set optim.max_steps=24
    python benchmarks/gpu_smoke.py check outputs/gpu_smoke/run --out result.json

`build` makes the model offline (no hub): Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV
heads, vocabulary 128256, tied embeddings) with random weights, and the demo tokenizer (its ids are a
subset of the vocabulary). `check` reads metrics.jsonl and fails unless the loss fell over the first run,
the resumed run continued from the checkpoint's step, and the HF export loads and scores a prompt.
`--tiny` builds a small model of the same family (its vocabulary the tokenizer's), for trying the flow on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import common  # benchmarks/common.py, beside this script

LLAMA_3_2_1B = {**common.LLAMA_3_2_1B, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
TINY = dict(
    LLAMA_3_2_1B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build(out_dir: Path, tiny: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clo_fast.demo_model import demo_texts, train_tokenizer

    tok = train_tokenizer(demo_texts())
    # tiny: the vocabulary cut to the tokenizer's (rounded up to 64), so the CPU flow is not all LM head
    shape = dict(TINY, vocab_size=-(-len(tok) // 64) * 64) if tiny else LLAMA_3_2_1B
    cfg = LlamaConfig(
        **shape,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"built": str(out_dir), "parameters": n, "vocab": cfg.vocab_size, "tokenizer_vocab": len(tok)}))


def check(run_dir: Path, first_steps: int, out: Path | None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    first = [r for r in train if r["step"] <= first_steps]
    resumed = [r for r in train if r["step"] > first_steps]
    head = sum(r["loss"] for r in first[:3]) / max(1, len(first[:3]))
    tail = sum(r["loss"] for r in first[-3:]) / max(1, len(first[-3:]))
    result = {
        "steps_first_run": len(first),
        "steps_resumed": len(resumed),
        "loss_first3": head,
        "loss_last3": tail,
        "loss_fell": tail < head,
        "resumed_from_checkpoint": bool(resumed) and resumed[0]["step"] == first_steps + 1,
        "tokens_per_s": [r.get("tokens/s") for r in train[-3:]],
        "peak_memory_mib": train[-1].get("peak_memory_mib"),
    }
    export = run_dir / "hf_model"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).to(device)
    tok = AutoTokenizer.from_pretrained(export)
    ids = tok("### Instruction:\nHabari?\n\n### Response:\n", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        scored = model(input_ids=ids, labels=ids)
    result["export_loads"] = True
    result["export_nll"] = float(scored.loss)
    result["export_finite"] = bool(torch.isfinite(scored.logits).all())
    ok = result["loss_fell"] and result["resumed_from_checkpoint"] and result["export_finite"]
    result["ok"] = ok
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out.write_text(text)
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out_dir", type=Path)
    b.add_argument("--tiny", action="store_true")
    c = sub.add_parser("check")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--first-steps", type=int, default=20)
    c.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.out_dir, a.tiny)
        return 0
    return check(a.run_dir, a.first_steps, a.out)


if __name__ == "__main__":
    sys.exit(main())
