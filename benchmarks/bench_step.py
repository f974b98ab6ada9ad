"""One CLO optimizer step: ours (backbone → fused head, reference log-probs precomputed) against the
reference path a TRL-style DPOTrainer takes (materialized [4B,T,V] logits, a live frozen reference model
run every step). Same random model, same batch, same optimizer; reports seconds/step, tokens/s and peak
memory, writes JSON to benchmarks/results/ and prints a short table.

    python benchmarks/bench_step.py                       # CPU, small Llama shape
    python benchmarks/bench_step.py --gpu                 # CUDA, Llama-3.2-1B-shaped random model, bf16
    python benchmarks/bench_step.py --shape llama-3.2-1b --device cuda --seq-len 1024 --examples 2

Each variant runs in its own subprocess, so peak memory is that variant's alone (CUDA: max allocated;
CPU: peak RSS of the process). Does not need DeepSpeed (a single device, no ZeRO): it measures the
head + loss + reference-model cost that ZeRO-3 does not change.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: LlamaConfig fields
    "cpu-small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}
ATTN_ONLY = ["*self_attn.q_proj*", "*self_attn.k_proj*", "*self_attn.v_proj*", "*self_attn.o_proj*"]


def make_model(shape: str, dtype, device, seq_len: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(2048, seq_len), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def make_batch(vocab: int, examples: int, seq_len: int, device):
    """4 sequences per example, full length (no padding); the second half of each is the response."""
    import torch

    g = torch.Generator().manual_seed(1)
    S = 4 * examples
    ids = torch.randint(8, vocab, (S, seq_len), generator=g)
    labels = torch.full((S, seq_len), -100, dtype=torch.long)
    labels[:, seq_len // 2 - 1 : -1] = ids[:, seq_len // 2 :]  # shifted: position t scores token t+1
    mask = torch.ones_like(ids)
    resp = (labels != -100).sum(1).view(examples, 4)
    return {
        k: v.to(device)
        for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels, response_tokens=resp).items()
    }


def run_variant(a) -> dict:
    import torch

    from clo_fast.loss import clo_loss, gather_sequence_logps, reference_clo_loss
    from clo_fast.model import apply_trainable_patterns, build_policy

    device = torch.device(a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    torch.set_num_threads(max(1, a.threads)) if a.device == "cpu" else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports, before the model
    model = make_model(a.shape, dtype, device, a.seq_len)
    batch = make_batch(model.config.vocab_size, a.examples, a.seq_len, device)
    B = a.examples
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if device.type == "cuda" else 0

    if a.variant == "ours":
        policy = build_policy(model, head_impl=a.impl)
        apply_trainable_patterns(policy, ATTN_ONLY)
        with torch.no_grad():  # the trainer's one-off reference pass (stored with the data)
            ref = policy(batch["input_ids"], batch["attention_mask"], batch["labels"]).view(B, 4).float()
        ref = ref + 0.05 * torch.randn_like(ref)
        params = [p for p in policy.parameters() if p.requires_grad]

        def step():
            logps = policy(batch["input_ids"], batch["attention_mask"], batch["labels"]).view(B, 4)
            loss, _ = clo_loss(logps, ref, batch["response_tokens"], 0.1, 0.5, validate=False)
            loss.backward()
            return loss
    else:
        import copy

        apply_trainable_patterns(model, ATTN_ONLY)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # live reference model, as TRL keeps it
        with torch.no_grad():
            logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            noise = 0.05 * torch.randn(B, 4, device=device)
            del logits
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            with torch.no_grad():
                rl = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ref = gather_sequence_logps(rl, batch["labels"])[0].view(B, 4) + noise
                del rl
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, _ = reference_clo_loss(logits, batch["labels"], ref, 0.1, 0.5, validate=False)
            loss.backward()
            return loss

    opt = torch.optim.AdamW(params, lr=1e-5)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= a.warmup:
            times.append(dt)
    tokens = int(batch["attention_mask"].sum())
    sec = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        peak_kind = "cuda max_memory_allocated above the inputs (MiB)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
        peak_kind = "process peak RSS above the RSS after imports (MiB): model, batch, step"
    return {
        "variant": a.variant,
        "seconds_per_step_median": sec,
        "seconds_per_step": times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / sec,
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "first_loss": losses[0],
        "losses": losses,
    }


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (torch {torch.__version__})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="shorthand: --device cuda --shape llama-3.2-1b --dtype bfloat16")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256 CPU / 1024 GPU)")
    p.add_argument("--examples", type=int, default=None, help="examples per step, x4 sequences (default 1 CPU / 2 GPU)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impl", default="auto", help="head impl for ours: auto | triton | torch")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--variants", default="ours,reference")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/bench_step_<shape>_<device>.json)"
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.gpu:
        a.device, a.shape, a.dtype = a.device or "cuda", a.shape or "llama-3.2-1b", a.dtype or "bfloat16"
    a.device = a.device or "cpu"
    a.shape = a.shape or ("llama-3.2-1b" if a.device == "cuda" else "cpu-small")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.seq_len = a.seq_len or (1024 if a.device == "cuda" else 256)
    a.examples = a.examples or (2 if a.device == "cuda" else 1)

    if a.variant:  # child process
        res = run_variant(a)
        Path(a.json_out).write_text(json.dumps(res))
        return 0

    results, errors = {}, {}
    for v in a.variants.split(","):
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "r.json"
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                v,
                "--json-out",
                str(out),
                "--shape",
                a.shape,
                "--device",
                a.device,
                "--dtype",
                a.dtype,
                "--seq-len",
                str(a.seq_len),
                "--examples",
                str(a.examples),
                "--steps",
                str(a.steps),
                "--warmup",
                str(a.warmup),
                "--impl",
                a.impl,
                "--threads",
                str(a.threads),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not out.is_file():
                errors[v] = (r.stderr or r.stdout)[-2000:]
                print(f"[bench_step] {v} failed:\n{errors[v]}", file=sys.stderr)
                continue
            results[v] = json.loads(out.read_text())
    report = {
        "benchmark": "bench_step",
        "machine": machine(a.device),
        "device": a.device,
        "shape": a.shape,
        "model": SHAPES[a.shape],
        "dtype": a.dtype,
        "seq_len": a.seq_len,
        "examples": a.examples,
        "sequences": 4 * a.examples,
        "head_impl": a.impl,
        "steps": a.steps,
        "warmup": a.warmup,
        "trainable": "attention q/k/v/o only",
        "results": results,
        "errors": errors,
    }
    if "ours" in results and "reference" in results:
        o, r = results["ours"], results["reference"]
        report["speedup_vs_reference"] = o["tokens_per_s"] / r["tokens_per_s"]
        report["peak_memory_ratio_vs_reference"] = o["peak_memory_mib"] / r["peak_memory_mib"]
        report["first_loss_abs_diff"] = abs(o["first_loss"] - r["first_loss"])
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"bench_step_{a.shape}_{a.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(
        f"bench_step  {a.shape}  {a.device} {a.dtype}  {4 * a.examples} seqs x {a.seq_len} tokens  [{report['machine']}]"
    )
    print(f"{'variant':10} {'s/step':>9} {'tokens/s':>10} {'peak MiB':>10} {'loss@1':>10}")
    for v, res in results.items():
        print(
            f"{v:10} {res['seconds_per_step_median']:9.4f} {res['tokens_per_s']:10.1f} {res['peak_memory_mib']:10.1f} "
            f"{res['first_loss']:10.5f}"
        )
    if "speedup_vs_reference" in report:
        print(
            f"ours/reference: {report['speedup_vs_reference']:.2f}x tokens/s, "
            f"{report['peak_memory_ratio_vs_reference']:.2f}x peak memory"
        )
    print(f"written: {out}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
