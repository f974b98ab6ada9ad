"""One CLO optimizer step over the same examples in every packing mode and for the peers (issue #10).

Variants (all: the same random Llama-shaped model, attention q/k/v/o trainable, AdamW, the same examples per
step, reference log-probs precomputed — a constant per sequence, as TRL's `precompute_ref_log_probs`):
  padded_full_head    padded micro-batches, every padded row through the fused head (main before issue #10)
  none                padded micro-batches, only labelled rows through the head
  padding_free        every sequence of a micro-batch once in one stream
  prefix_shared       each prompt once, followed by both of its responses
Micro-batches (`--split`): `trainer` (default) the same count in every mode, ceil(examples / --micro), balanced
by tokens as the trainer makes them (the demo config's step); `budget` packed modes filled up to
--token-budget body tokens (fewer, larger micro-batches), padded ones --micro consecutive examples.
  trl_liger           TRL DPOTrainer semantics: padded micro-batches, one backbone pass over the 4 sequences,
                      Liger's LigerFusedLinearDPOLoss once per direction ([chosen; rejected] stacked), the
                      NLL on the target direction (compute_nll_loss); CUDA with liger_kernel installed only
  materialized_logits padded micro-batches, [rows, T, V] logits + log-softmax (clo_fast.loss.reference_clo_loss)

Per variant and length profile, the JSON has: body_tokens_per_example (tokens the backbone processes),
head_rows_per_example (rows the LM head does GEMMs for), step_ms (median over --steps after --warmup),
peak_mib (CUDA: max allocated above the model's weights; CPU: the variant process's peak RSS above its
RSS after building the model), plus first_loss (our modes agree to ~1e-5: they are exact) and the micro-batch
count; model_flops_per_step, model_tokens_per_s and mfu (model FLOPs per second over the measured matmul peak
and the datasheet's bf16 peak: `model_flops`, `peak_flops`); with --profile-split, profile_split (one more
step under torch.profiler split into attention, body GEMMs, head, optimizer, other and idle); with
--liger-body, Liger's RMSNorm/RoPE/SwiGLU on every variant's body. Length profiles (benchmarks/common.py
LENGTH_PROFILES; it says where the numbers come from):
  demo   the bundled demo data's profile (short pairs, max 128 tokens)
  oasst  OpenAssistant-like prompts/responses, target language ≈1.4× the English token count

    python benchmarks/bench_step.py              # CPU: the demo model's shape and profile (~2 min)
    python benchmarks/bench_step.py --gpu        # CUDA: Llama-3.2-1B shape, bf16, oasst + demo profiles

CPU timing: the machine may be shared, so step_ms comes from one process that runs every variant's steps
round-robin, the order rotated every round (median wall time of --steps rounds after --warmup, with p10/p90
and min; step_ms_own_process is the variant's one step in its own process), and step_cpu_ms is that
process's CPU time per step (one thread by default: the work itself, little disturbed by other load).
"paired_round_ratios": per round, none's (padded_full_head's) step time over the packed mode's in the same round, then
the median and p10/p90 of those ratios (both steps of a pair saw the same load). host_build_ms: building
one step's micro-batches on the host (done before timing for every variant, so not in step_ms). CUDA: the
median of --steps.
Robustness: variants run in child processes (CPU: one per variant, so the peak RSS is the variant's own;
CUDA: one child runs the variants in turn, resetting the CUDA peak between them, and a crashed child is
replaced by a fresh one that skips the variant it died in). A failing variant is recorded under "errors";
the JSON is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from common import LLAMA_3_2_1B, machine_info, model_flops, peak_flops, profile_split, quantile  # noqa: E402

from clo_fast.constants import ATTENTION_ONLY_PATTERNS  # noqa: E402
from clo_fast.demo_model import MODEL_SHAPE as DEMO_MODEL_SHAPE  # noqa: E402
from clo_fast.demo_model import VOCAB_SIZE as DEMO_VOCAB_SIZE  # noqa: E402

SHAPES = {
    # name: LlamaConfig fields. "demo": the demo model's shape (clo_fast/demo_model.py MODEL_SHAPE, its
    # 2048-token vocabulary), i.e. the demo config's step; "cpu-small": a head-heavier small shape (V = 32000)
    "demo": {**DEMO_MODEL_SHAPE, "vocab_size": DEMO_VOCAB_SIZE},
    "cpu-small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": LLAMA_3_2_1B,
    # SmolLM2-135M-Instruct (configs/smollm2_sw.yaml's real model): small body, a 49152-token tied head
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
    },
    # gpu_check's CPU dry run: the smallest Llama that runs every code path
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "tie_word_embeddings": True,
    },
}
ATTN_ONLY = list(ATTENTION_ONLY_PATTERNS)
VARIANTS = ("padded_full_head", "none", "padding_free", "prefix_shared", "trl_liger", "materialized_logits")
PACKED = ("padding_free", "prefix_shared")
BETA, LAM = 0.1, 0.5
PAD_ID, EOS_ID = 0, 2


# ------------------------------------------------------------------------------------------ inputs
def make_examples(profile: str, n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenized CLO examples with the profile's lengths (benchmarks/common.py sample_lengths): random tokens,
    responses ending in EOS, labels -100 on the prompt, as clo_fast.data.tokenize_dataset lays them out."""
    import torch
    from common import CLO_SEQUENCES, sample_lengths

    g = torch.Generator().manual_seed(seed + 1)

    def tokens(k):
        return torch.randint(8, vocab, (k,), generator=g).tolist()

    out = []
    for ln in sample_lengths(profile, n, seed):
        parts = {
            "x_en": tokens(ln["x_en"]),
            "x_tgt": tokens(ln["x_tgt"]),
            "y_en": tokens(ln["y_en"] - 1) + [EOS_ID],
            "y_tgt": tokens(ln["y_tgt"] - 1) + [EOS_ID],
        }
        ids, labels = [], []
        for x, y in CLO_SEQUENCES:  # sample_lengths already cut the lengths so every sequence fits
            ids.append(parts[x] + parts[y])
            labels.append([-100] * len(parts[x]) + parts[y])
        out.append({"input_ids": ids, "labels": labels})
    return out


def apply_liger_body(model) -> None:
    """Liger's fused RMSNorm, RoPE and SwiGLU on the body, as TRL's `use_liger_kernel` applies them (its head
    kernels stay off: each variant brings its own head). The RoPE patch replaces transformers' Llama
    `apply_rotary_pos_emb` for the whole process, so --liger-body is applied to every variant alike."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
    )


def make_model(shape: str, dtype, device, attn: str, liger_body: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {"max_position_embeddings": 4096, **SHAPES[shape]}  # a shape may state its own (the demo's: 1024)
    cfg = LlamaConfig(**fields, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the run dtype (no fp32 copy of a 1B model)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    if liger_body:
        apply_liger_body(model)
    return model


# -------------------------------------------------------------------------------------------- steps
def step_groups(variant: str, examples: list[dict], a) -> list[list[int]]:
    """The step's micro-batches (example indices). --split trainer (default): as the trainer makes them
    (clo_fast/training/batches.py MicroBatcher.step_batches: the global batch balanced by tokens into
    G·W = ceil(examples / micro) micro-batches, the same count in every mode), so the step is the demo config's
    step (2 examples × 2 accumulation × 2 ranks = 4 micro-batches of ~2 examples). --split budget: padded
    variants take consecutive groups of --micro examples, packed ones are filled up to --token-budget body
    tokens (fewer, larger micro-batches: what a token budget would give; the trainer does not do this)."""
    from clo_fast.packing import balance_micro_batches, plan_micro_batches

    n = len(examples)
    count = -(-n // a.micro)
    mode = "none" if variant in ("padded_full_head", "none", "trl_liger", "materialized_logits") else variant
    if a.split == "trainer":
        return [g for g in balance_micro_batches(examples, mode, count) if g]
    if variant in PACKED:
        return plan_micro_batches(examples, variant, a.token_budget)
    return [list(range(i, min(n, i + a.micro))) for i in range(0, n, a.micro)]


def build_step(variant: str, model, examples: list[dict], ref, a, device):
    """(step callable → loss, micro-batch stats). Every variant runs the same examples in one optimizer
    step; the loss is normalised with the step's global counts (clo_fast.loss.clo_loss docstring), so
    micro-batches of different sizes are weighted exactly."""
    import torch

    from clo_fast.model import apply_trainable_patterns, build_policy
    from clo_fast.packing import build_packed_batch

    n = len(examples)
    groups = step_groups(variant, examples, a)
    stats = {"micro_batches": len(groups), "examples_per_step": n}

    if variant == "materialized_logits":
        from clo_fast.loss import reference_clo_loss

        apply_trainable_patterns(model, ATTN_ONLY)
        pad_b = [_padded(examples, g, a, device) for g in groups]
        stats["body_tokens"] = stats["head_rows"] = sum(int(d["input_ids"].numel()) for d in pad_b)
        sft_den = float(sum(int(d["response_tokens"][:, 2].sum()) for d in pad_b))

        def step():
            total = 0.0
            for g, d in zip(groups, pad_b, strict=False):
                logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
                loss, _ = reference_clo_loss(
                    logits,
                    d["labels"],
                    ref[g],
                    BETA,
                    LAM,
                    sft_denominator=sft_den,
                    cl_denominator=2.0 * n,
                    validate=False,
                )
                loss.backward()
                total += float(loss.detach())
                del logits
            return total

        return step, stats, model

    if variant == "trl_liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        apply_trainable_patterns(model, ATTN_ONLY)
        with_nll = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=True, use_ref_model=False)
        dpo_only = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=False, use_ref_model=False)
        pad_b = [_padded(examples, g, a, device) for g in groups]
        stats["body_tokens"] = stats["head_rows"] = sum(int(d["input_ids"].numel()) for d in pad_b)
        backbone, weight = model.model, model.lm_head.weight

        def step():
            total = 0.0
            for g, d in zip(groups, pad_b, strict=False):
                h = backbone(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).last_hidden_state
                y = d["labels"]
                # [chosen; rejected] per direction: English (0 vs 1) and target (2 vs 3, + NLL on 2);
                # the precomputed reference log-probs are a constant shift of the logits (no GEMM)
                out_en = dpo_only(weight, torch.cat([h[0::4], h[1::4]]), torch.cat([y[0::4], y[1::4]]))
                out_tg = with_nll(weight, torch.cat([h[2::4], h[3::4]]), torch.cat([y[2::4], y[3::4]]))
                first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
                loss = (first(out_en) + first(out_tg)) * len(g) / n
                loss.backward()
                total += float(loss.detach())
            return total

        return step, stats, model

    # ours: padded_full_head / none / padding_free / prefix_shared through CLOPolicy
    from clo_fast.loss import clo_loss

    policy = build_policy(model, head_impl=a.impl)
    apply_trainable_patterns(policy, ATTN_ONLY)
    mode = "none" if variant == "padded_full_head" else variant
    batches = [
        build_packed_batch(
            [examples[i] for i in g], mode, PAD_ID, pad_to_multiple_of=a.pad_to if mode == "none" else a.stream_pad
        )
        for g in groups
    ]
    stats["body_tokens"] = sum(b.body_tokens for b in batches)
    stats["head_rows"] = (
        stats["body_tokens"] if variant == "padded_full_head" else sum(b.head_row_count for b in batches)
    )
    sft_den = float(sum(int(b.response_tokens[:, 2].sum()) for b in batches))
    cl_den = 2.0 * n
    batches = [b.to(device) for b in batches]
    full_head = variant == "padded_full_head"
    if full_head:  # the padded batch through the head whole: labels [4B,T] as collate_clo makes them
        padded = [_padded(examples, g, a, device) for g in groups]

    def step():
        total = 0.0
        for i, (g, b) in enumerate(zip(groups, batches, strict=False)):
            if full_head:
                d = padded[i]
                logps = policy(d["input_ids"], d["attention_mask"], d["labels"])
            else:
                logps = policy(b)
            loss, _ = clo_loss(
                logps.view(-1, 4),
                ref[g],
                b.response_tokens.to(logps.device),
                BETA,
                LAM,
                sft_denominator=sft_den,
                cl_denominator=cl_den,
                validate=False,
            )
            loss.backward()
            total += float(loss.detach())
        return total

    return step, stats, policy


def _padded(examples, g, a, device) -> dict:
    """Today's padded micro-batch (clo_fast.data.collate_clo) on the device."""
    from clo_fast.data import collate_clo

    d = collate_clo([examples[i] for i in g], PAD_ID, pad_to_multiple_of=a.pad_to)
    return {k: d[k].to(device) for k in ("input_ids", "attention_mask", "labels", "response_tokens")}


def reference_logps(a, examples, device, dtype):
    """Precomputed reference log-probs [N,4] (the frozen model = the initial model: one no-grad packed pass),
    shifted by a little noise so the DPO margins are not all 0."""
    import torch

    from clo_fast.model import build_policy
    from clo_fast.packing import build_packed_batch, plan_micro_batches

    model = make_model(a.shape, dtype, device, a.peer_attn)  # a precompute: any exact backend does
    policy = build_policy(model, head_impl=a.impl).eval()
    out = torch.zeros(len(examples), 4)
    with torch.no_grad():
        for g in plan_micro_batches(examples, "padding_free", a.token_budget):
            b = build_packed_batch([examples[i] for i in g], "padding_free", PAD_ID).to(device)
            out[g] = policy(b).view(-1, 4).float().cpu()
    del policy, model
    g = torch.Generator().manual_seed(3)
    return out + 0.05 * torch.randn(out.shape, generator=g)


def run_variant(variant: str, profile: str, a) -> dict:
    import torch

    device = torch.device(a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    cuda = device.type == "cuda"
    if variant == "trl_liger" and not cuda:
        raise RuntimeError("trl_liger needs CUDA (Liger's kernels are Triton GPU kernels)")
    vocab = SHAPES[a.shape]["vocab_size"]
    examples = make_examples(profile, a.examples, vocab, seed=a.seed)
    ref = reference_logps(a, examples, device, dtype).to(device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    model = make_model(
        a.shape,
        dtype,
        device,
        a.peer_attn if variant in ("trl_liger", "materialized_logits") else a.attn,
        liger_body=a.liger_body,
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if cuda else 0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step, stats, module = build_step(variant, model, examples, ref, a, device)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * 1e3
        losses.append(loss)
        if i >= a.warmup:
            times.append(dt)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    n = len(examples)
    extra = {}
    if a.profile_split:  # after the timed steps and the peak: the profiler's own cost is in neither
        extra["profile_split"] = profile_split(step, opt, cuda)
    flops = model_flops(model, examples)
    step_s = statistics.median(times) / 1e3
    peaks = peak_flops(device, dtype)
    extra["model_flops_per_step"] = flops
    extra["model_tokens_per_s"] = round(flops["tokens"] / step_s, 1)
    extra["mfu"] = {k: (round(flops["total"] / step_s / v, 4) if v else None) for k, v in peaks["flops_per_s"].items()}
    extra["peak_flops"] = peaks
    res = {
        "body_tokens_per_example": round(stats["body_tokens"] / n, 2),
        "head_rows_per_example": round(stats["head_rows"] / n, 2),
        "step_ms": round(statistics.median(times), 2),
        "peak_mib": round(peak, 1),
        "step_ms_all": [round(t, 2) for t in times],
        "first_loss": losses[0],
        "micro_batches": stats["micro_batches"],
        "examples_per_step": n,
        **extra,
    }
    del step, module, opt, params, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def _spread(prefix: str, xs: list[float]) -> dict:
    return {
        prefix: round(statistics.median(xs), 2),
        f"{prefix}_p10": round(quantile(xs, 0.1), 2),
        f"{prefix}_p90": round(quantile(xs, 0.9), 2),
        f"{prefix}_min": round(min(xs), 2),
    }


def host_build_ms(variant: str, examples: list[dict], a, repeats: int = 5) -> float | None:
    """Median wall time to build one step's micro-batches on the host (our variants): not part of step_ms
    (every variant's inputs are built before timing), reported next to it because the trainer builds them
    on the host every step."""
    from clo_fast.packing import build_packed_batch

    if variant not in ("padded_full_head", "none") + PACKED:
        return None
    mode = "none" if variant == "padded_full_head" else variant
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for g in step_groups(variant, examples, a):
            build_packed_batch(
                [examples[i] for i in g], mode, PAD_ID, pad_to_multiple_of=a.pad_to if mode == "none" else a.stream_pad
            )
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 2)


def interleaved_step_ms(variants: list[str], profile: str, a) -> dict:
    """CPU timing on a shared machine: every variant built in this one process, their steps run round-robin
    so load from other processes hits all of them alike; the order rotates every round (round r starts at
    variant r mod n), so no variant always runs right after the same one. Returns per variant
    {"step_ms" (median wall), p10/p90/min, "step_cpu_ms" (median CPU time of this process) and its spread,
    the per-round lists} or {"error"}; and under "_paired", per pair (mode, base): the median over rounds of
    base_ms / mode_ms within the same round (both steps saw the same load)."""
    import torch

    device = torch.device(a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    examples = make_examples(profile, a.examples, SHAPES[a.shape]["vocab_size"], seed=a.seed)
    ref = reference_logps(a, examples, device, dtype).to(device)
    live, out = {}, {}
    for v in variants:
        try:
            model = make_model(
                a.shape,
                dtype,
                device,
                a.peer_attn if v in ("trl_liger", "materialized_logits") else a.attn,
                liger_body=a.liger_body,
            )
            step, _, module = build_step(v, model, examples, ref, a, device)
            opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
            live[v] = (step, opt)
        except Exception as e:  # noqa: BLE001
            out[v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    times = {v: [None] * a.steps for v in live}
    cpu_times = {v: [None] * a.steps for v in live}
    for i in range(a.warmup + a.steps):
        order = list(live)
        order = order[i % len(order) :] + order[: i % len(order)] if order else order
        for v in order:
            if v not in live:
                continue
            step, opt = live[v]
            c0 = time.process_time()
            t0 = time.perf_counter()
            try:
                step()
                opt.step()
                opt.zero_grad(set_to_none=True)
            except Exception as e:  # noqa: BLE001
                out[v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                live.pop(v)
                continue
            if i >= a.warmup:
                times[v][i - a.warmup] = (time.perf_counter() - t0) * 1e3
                cpu_times[v][i - a.warmup] = (time.process_time() - c0) * 1e3
    for v in live:
        # wall time: median of the interleaved rounds; CPU time of this process: the work itself, much less
        # disturbed by other processes' load on a shared machine (with 1 thread, no spin-waiting in it)
        out[v] = {
            **_spread("step_ms", times[v]),
            "step_ms_all": [round(t, 2) for t in times[v]],
            **_spread("step_cpu_ms", cpu_times[v]),
            "step_cpu_ms_all": [round(t, 2) for t in cpu_times[v]],
            "host_build_ms": host_build_ms(v, examples, a),
        }
    paired = {}
    for mode in PACKED + ("none",):
        for base in ("none", "padded_full_head"):
            if mode in live and base in live and mode != base:
                r = [tb / tm for tb, tm in zip(times[base], times[mode], strict=True)]
                rc = [tb / tm for tb, tm in zip(cpu_times[base], cpu_times[mode], strict=True)]
                paired[f"{mode}_vs_{base}"] = {
                    "wall_ratio_median": round(statistics.median(r), 3),
                    "wall_ratio_p10": round(quantile(r, 0.1), 3),
                    "wall_ratio_p90": round(quantile(r, 0.9), 3),
                    "cpu_ratio_median": round(statistics.median(rc), 3),
                    "cpu_ratio_p10": round(quantile(rc, 0.1), 3),
                    "cpu_ratio_p90": round(quantile(rc, 0.9), 3),
                }
    out["_paired"] = paired
    return out


# --------------------------------------------------------------------------------------- reporting
def summarize(results: dict) -> dict:
    """Ratios the issue's targets are stated in, per profile."""
    out = {}
    for profile, res in results.items():
        s = {}
        if "prefix_shared" in res and "padded_full_head" in res:
            s["prefix_shared_body_tokens_vs_padded_full_head"] = round(
                res["prefix_shared"]["body_tokens_per_example"] / res["padded_full_head"]["body_tokens_per_example"], 3
            )
        for mode in PACKED + ("none",):
            for base in ("none", "padded_full_head", "trl_liger"):
                if mode in res and base in res and mode != base:
                    s[f"{mode}_speedup_vs_{base}"] = round(res[base]["step_ms"] / res[mode]["step_ms"], 3)
                    if "step_cpu_ms" in res[mode] and "step_cpu_ms" in res[base]:
                        s[f"{mode}_cpu_time_speedup_vs_{base}"] = round(
                            res[base]["step_cpu_ms"] / res[mode]["step_cpu_ms"], 3
                        )
                    s[f"{mode}_peak_mib_vs_{base}"] = round(res[mode]["peak_mib"] / max(res[base]["peak_mib"], 1e-9), 3)
        ours = [res[m]["first_loss"] for m in ("padded_full_head", "none") + PACKED if m in res]
        if len(ours) > 1:
            s["our_modes_first_loss_max_abs_diff"] = max(ours) - min(ours)
        out[profile] = s
    return out


def write_report(a, results: dict, errors: dict, out: Path, paired: dict | None = None) -> None:
    report = {
        "benchmark": "bench_step",
        "issue": 10,
        "machine": machine_info(a.device),
        "device": a.device,
        "shape": a.shape,
        "model": SHAPES[a.shape],
        "dtype": a.dtype,
        "attn_implementation": a.attn,
        "peer_attn_implementation": a.peer_attn,
        "stream_pad": a.stream_pad,
        "head_impl": a.impl,
        "liger_body_kernels": a.liger_body,
        "examples_per_step": a.examples,
        "padded_micro_examples": a.micro,
        "pad_to_multiple_of": a.pad_to,
        "token_budget": a.token_budget,
        "micro_batch_split": a.split,
        "steps": a.steps,
        "warmup": a.warmup,
        "profiles": a.profiles.split(","),
        "trainable": "attention q/k/v/o only",
        "reference_logps": "precomputed (all variants)",
        "peak_mib_kind": (
            "cuda max_memory_allocated above the model weights"
            if a.device == "cuda"
            else "peak RSS of the variant's process above its RSS after building the model"
        ),
        "results": results,
        "summary": summarize(results),
        "paired_round_ratios": paired or {},
        "errors": errors,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)


def child(a) -> int:
    """Run the variants × profiles given; append one JSON line per finished (variant, profile)."""
    import torch

    if a.device == "cpu":
        torch.set_num_threads(max(1, a.threads))
    if a.interleave:
        for profile in a.profiles.split(","):
            for v, r in interleaved_step_ms(a.variants.split(","), profile, a).items():
                with open(a.lines_out, "a") as f:
                    f.write(json.dumps({"variant": v, "profile": profile, "timing": r}) + "\n")
        return 0
    for v in a.variants.split(","):
        for profile in a.profiles.split(","):
            rec = {"variant": v, "profile": profile}
            print(f"[bench_step] {v} / {profile} ...", file=sys.stderr, flush=True)
            try:
                rec["result"] = run_variant(v, profile, a)
            except Exception as e:  # noqa: BLE001 - a failing variant is a result, not a crash
                import traceback

                rec["error"] = f"{type(e).__name__}: {str(e)[:500]}\n{traceback.format_exc()[-1500:]}"
                if a.device == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
            with open(a.lines_out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--gpu", action="store_true", help="--device cuda --shape llama-3.2-1b --dtype bfloat16 --profiles oasst,demo"
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--num-layers", type=int, default=None, help="the shape with this many layers (tests: every shape)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--profiles", default=None, help="comma list of benchmarks/common.py LENGTH_PROFILES")
    p.add_argument("--examples", type=int, default=None, help="examples per optimizer step (default 16)")
    p.add_argument(
        "--micro", type=int, default=None, help="examples per padded micro-batch (default 2: the demo config)"
    )
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="body tokens per packed micro-batch (default 1024 CPU / 4096 GPU)",
    )
    p.add_argument(
        "--split",
        choices=["trainer", "budget"],
        default="trainer",
        help="micro-batches as the trainer makes them (same count in every mode) or by --token-budget (packed)",
    )
    p.add_argument("--pad-to", type=int, default=None, help="padded length multiple (default 16 CPU / 64 GPU)")
    p.add_argument(
        "--attn", default="sdpa", help="attention implementation of our variants (padded_full_head/none/packed)"
    )
    p.add_argument("--peer-attn", default="sdpa", help="attention implementation of the peers")
    p.add_argument(
        "--stream-pad",
        type=int,
        default=1,
        help="packed stream length multiple (fewer shapes for compiled kernels, e.g. 512 with flex_attention)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 CUDA / 30 interleaved rounds CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CUDA / 3 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default="auto", help="head impl for ours: auto | triton | torch")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--liger-body",
        action="store_true",
        help="Liger's RMSNorm/RoPE/SwiGLU kernels on every variant's body, as TRL's use_liger_kernel (CUDA)",
    )
    p.add_argument(
        "--profile-split",
        action="store_true",
        help="one more step per variant under torch.profiler, its time split by category (attention, body GEMMs, "
        "head, optimizer, other, idle) in the JSON",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per child process (default 600)")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/bench_step_<shape>_<device>.json)"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interleave", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lines-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.num_layers is not None:  # the shape's widths and head, fewer layers
        SHAPES[a.shape or "demo"] = {**SHAPES[a.shape or "demo"], "num_hidden_layers": a.num_layers}
    if a.gpu:
        a.device, a.shape, a.dtype = a.device or "cuda", a.shape or "llama-3.2-1b", a.dtype or "bfloat16"
        a.profiles = a.profiles or "oasst,demo"
    a.device = a.device or "cpu"
    gpu = a.device == "cuda"
    a.shape = a.shape or ("llama-3.2-1b" if gpu else "demo")
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.profiles = a.profiles or ("oasst,demo" if gpu else "demo")
    a.examples = a.examples or (16 if gpu else 8)
    a.steps = a.steps or (3 if gpu else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if gpu else 3)
    a.micro = a.micro or 2
    a.token_budget = a.token_budget or (4096 if gpu else 1024)
    a.pad_to = a.pad_to or (64 if gpu else 16)
    if a.child:
        return child(a)

    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"bench_step_{a.shape}_{a.device}.json"
    variants = [v for v in a.variants.split(",") if v]
    if not gpu and "trl_liger" in variants:
        variants.remove("trl_liger")  # Liger is GPU-only: recorded as skipped below
    results: dict = {pr: {} for pr in a.profiles.split(",")}
    errors: dict = {}
    paired: dict = {}
    if not gpu and "trl_liger" in a.variants.split(","):
        errors["trl_liger"] = "skipped: Liger's kernels need CUDA"
    own_steps = ["--steps", "1", "--warmup", "0"] if not gpu else []  # CPU: times come from the interleaved run
    passthrough = (
        [
            "--shape",
            a.shape,
            "--device",
            a.device,
            "--dtype",
            a.dtype,
            "--profiles",
            a.profiles,
            "--examples",
            str(a.examples),
            "--micro",
            str(a.micro),
            "--token-budget",
            str(a.token_budget),
            "--split",
            a.split,
            "--pad-to",
            str(a.pad_to),
            "--attn",
            a.attn,
            "--peer-attn",
            a.peer_attn,
            "--stream-pad",
            str(a.stream_pad),
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
            "--seed",
            str(a.seed),
            "--impl",
            a.impl,
            "--threads",
            str(a.threads),
        ]
        + (["--num-layers", str(a.num_layers)] if a.num_layers is not None else [])
        + (["--profile-split"] if a.profile_split else [])
        + (["--liger-body"] if a.liger_body else [])
    )
    remaining = list(variants)
    with tempfile.TemporaryDirectory() as td:
        while remaining:
            # CPU: one variant per process (peak RSS is per process); CUDA: the rest in one process
            batch = remaining[:1] if not gpu else list(remaining)
            lines = Path(td) / f"lines_{len(remaining)}.jsonl"
            cmd = (
                [sys.executable, __file__, "--child", "--lines-out", str(lines), "--variants", ",".join(batch)]
                + passthrough
                + own_steps
            )
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout or 600)
                rc, tail = r.returncode, (r.stderr or r.stdout)[-3000:]
            except subprocess.TimeoutExpired as e:
                rc, tail = -1, f"timed out after {e.timeout} s"
            done = set()
            if lines.is_file():
                for line in lines.read_text().splitlines():
                    rec = json.loads(line)
                    done.add(rec["variant"])
                    if "result" in rec:
                        results.setdefault(rec["profile"], {})[rec["variant"]] = rec["result"]
                    else:
                        errors[f"{rec['variant']}/{rec['profile']}"] = rec["error"]
            finished = [
                v
                for v in batch
                if v in done and all(v in results.get(pr, {}) or f"{v}/{pr}" in errors for pr in a.profiles.split(","))
            ]
            for v in finished:
                remaining.remove(v)
            if rc != 0 or not finished:
                # the child died inside the first unfinished variant: record it and go on without it
                stuck = next((v for v in batch if v not in finished), None)
                if stuck is not None:
                    errors[stuck] = f"child process failed (rc {rc}): {tail}"
                    remaining.remove(stuck)
                    print(f"[bench_step] {stuck} failed:\n{tail}", file=sys.stderr)
            write_report(a, results, errors, out)

    if not gpu and variants:
        # CPU: the per-variant processes above give the counts and each variant's own peak RSS; the step
        # times come from one process that runs every variant's steps round-robin (fair under shared load)
        lines = Path(tempfile.mkdtemp()) / "interleaved.jsonl"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--interleave",
            "--lines-out",
            str(lines),
            "--variants",
            ",".join(v for v in variants if any(v in results[pr] for pr in results)),
        ] + passthrough
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout or 1200)
            tail = (r.stderr or r.stdout)[-2000:]
        except subprocess.TimeoutExpired as e:
            tail = f"timed out after {e.timeout} s"
        if lines.is_file():
            for line in lines.read_text().splitlines():
                rec = json.loads(line)
                if rec["variant"] == "_paired":
                    paired[rec["profile"]] = rec["timing"]
                    continue
                res = results.get(rec["profile"], {}).get(rec["variant"])
                if res is None:
                    continue
                if "error" in rec["timing"]:
                    errors[f"{rec['variant']}/{rec['profile']}/interleaved"] = rec["timing"]["error"]
                    continue
                res["step_ms_own_process"] = res["step_ms"]
                res.update(rec["timing"])
                res["step_ms_kind"] = (
                    "median (p10, p90) of rounds interleaved with the other variants in one process, order "
                    "rotated every round (wall); step_cpu_ms: that process's CPU time per step"
                )
        else:
            errors["interleaved_timing"] = tail
        write_report(a, results, errors, out, paired)

    print(f"bench_step  {a.shape}  {a.device} {a.dtype}  {a.examples} examples/step  [{machine_info(a.device)}]")
    for profile, res in results.items():
        print(f"-- profile {profile}")
        print(
            f"{'variant':20} {'body tok/ex':>11} {'head rows/ex':>12} {'step ms':>9} {'p10-p90':>15} {'cpu ms':>8} "
            f"{'peak MiB':>9} {'micro':>5} {'loss@1':>9}"
        )
        for v, r in res.items():
            spread = f"{r['step_ms_p10']:.0f}-{r['step_ms_p90']:.0f}" if "step_ms_p10" in r else "-"
            cpu = f"{r['step_cpu_ms']:.1f}" if "step_cpu_ms" in r else "-"
            print(
                f"{v:20} {r['body_tokens_per_example']:11.1f} {r['head_rows_per_example']:12.1f} {r['step_ms']:9.1f} "
                f"{spread:>15} {cpu:>8} {r['peak_mib']:9.1f} {r['micro_batches']:5d} {r['first_loss']:9.5f}"
            )
    print(json.dumps(summarize(results), indent=1))
    if paired:
        print(json.dumps(paired, indent=1))
    if errors:
        print("errors: " + ", ".join(errors))
    print(f"written: {out}")
    return 0 if not [k for k in errors if not errors[k].startswith("skipped")] else 1


if __name__ == "__main__":
    sys.exit(main())
