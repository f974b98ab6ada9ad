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

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common
from common import LLAMA_SHAPES, PAD_ID, machine_info, make_examples, make_model, with_optimizer

from clo_fast.constants import ATTENTION_ONLY_PATTERNS

SHAPES = LLAMA_SHAPES  # --shape's names (benchmarks/common.py)
ATTN_ONLY = list(ATTENTION_ONLY_PATTERNS)
BETA, LAM = 0.1, 0.5
# the defaults of the flags left unset, per device (--gpu takes the CUDA column's shape, dtype and profiles)
DEVICE_DEFAULTS = {
    "cpu": {"shape": "demo", "dtype": "float32", "profiles": "demo", "examples": 8, "steps": 30, "warmup": 3,
            "token_budget": 1024, "pad_to": 16},
    "cuda": {"shape": "llama-3.2-1b", "dtype": "bfloat16", "profiles": "oasst,demo", "examples": 16, "steps": 3,
             "warmup": 1, "token_budget": 4096, "pad_to": 64},
}  # fmt: skip
# the flags a child process gets as they are (after the defaults above are filled in)
CHILD_FLAGS = ("shape", "device", "dtype", "profiles", "examples", "micro", "token_budget", "split", "pad_to", "attn",
               "peer_attn", "stream_pad", "steps", "warmup", "seed", "impl", "threads", "num_layers")  # fmt: skip
# the report's run settings: (JSON field, flag attribute), in the report's order
REPORTED_FLAGS = (("dtype", "dtype"), ("attn_implementation", "attn"), ("peer_attn_implementation", "peer_attn"),
                  ("stream_pad", "stream_pad"), ("head_impl", "impl"), ("liger_body_kernels", "liger_body"),
                  ("examples_per_step", "examples"), ("padded_micro_examples", "micro"),
                  ("pad_to_multiple_of", "pad_to"), ("token_budget", "token_budget"), ("micro_batch_split", "split"),
                  ("steps", "steps"), ("warmup", "warmup"))  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """Everything that tells the variants apart, in one record (VARIANTS below). setup: builds its step; layout:
    the packing mode its micro-batches are balanced and built in; full_head: every padded row through the head;
    peer: a peer's implementation (runs with --peer-attn, builds no CLO batch on the host); needs_cuda: what
    keeps it off the CPU ("" when nothing does)."""

    setup: Callable
    layout: str = "none"
    full_head: bool = False
    peer: bool = False
    needs_cuda: str = ""


# ------------------------------------------------------------------------------------------ inputs
def variant_model(variant: str, a, dtype, device):
    """The model a variant trains: every variant gets the same weights (make_model seeds), the peers --peer-attn."""
    attn = a.peer_attn if VARIANTS[variant].peer else a.attn
    return make_model(a.shape, dtype, device, attn, liger_body=a.liger_body)


def step_inputs(profile: str, a, device, dtype):
    """The step's examples and their reference log-probs (the same for every variant: a.seed)."""
    examples = make_examples(profile, a.examples, SHAPES[a.shape]["vocab_size"], seed=a.seed)
    frozen = make_model(a.shape, dtype, device, a.peer_attn)  # a precompute: any exact backend does
    return examples, common.reference_logps(frozen, examples, a.impl, a.token_budget, device).to(device)


# ---------------------------------------------------------------------------------------- micro-batches
def step_groups(variant: str, examples: list[dict], a) -> list[list[int]]:
    """The step's micro-batches (example indices). --split trainer (default): as the trainer makes them
    (clo_fast/training/batches.py MicroBatcher.step_batches: the global batch balanced by tokens into
    G·W = ceil(examples / micro) micro-batches, the same count in every mode), so the step is the demo config's
    step (2 examples × 2 accumulation × 2 ranks = 4 micro-batches of ~2 examples). --split budget: padded
    variants take consecutive groups of --micro examples, packed ones are filled up to --token-budget body
    tokens (fewer, larger micro-batches: what a token budget would give; the trainer does not do this)."""
    from clo_fast.packing import balance_micro_batches, plan_micro_batches

    n, layout = len(examples), VARIANTS[variant].layout
    if a.split == "trainer":
        return [g for g in balance_micro_batches(examples, layout, -(-n // a.micro)) if g]
    if layout != "none":
        return plan_micro_batches(examples, layout, a.token_budget)
    return [list(range(i, min(n, i + a.micro))) for i in range(0, n, a.micro)]


def clo_batches(layout: str, examples: list[dict], groups, a) -> list:
    """Our micro-batches (clo_fast.packing.build_packed_batch), on the host: padded ones to --pad-to, packed
    streams to --stream-pad."""
    from clo_fast.packing import build_packed_batch

    pad = a.pad_to if layout == "none" else a.stream_pad
    return [build_packed_batch([examples[i] for i in g], layout, PAD_ID, pad_to_multiple_of=pad) for g in groups]


def padded_batches(examples: list[dict], groups, a, device) -> list[dict]:
    """Today's padded micro-batches (clo_fast.data.collate_clo) on the device."""
    from clo_fast.data import collate_clo

    keys = ("input_ids", "attention_mask", "labels", "response_tokens")
    batches = [collate_clo([examples[i] for i in g], PAD_ID, pad_to_multiple_of=a.pad_to) for g in groups]
    return [{k: d[k].to(device) for k in keys} for d in batches]


# ------------------------------------------------------------------------------------ one setup per variant
# A setup gets (its Variant, the model, the examples, the micro-batches, the reference log-probs, the flags,
# the device) and returns (step callable → the summed loss, the module that trains, body tokens, head rows).
# Every variant runs the same examples in one optimizer step; the loss is normalised with the step's global
# counts (clo_fast.loss.clo_loss docstring), so micro-batches of different sizes are weighted exactly.
def setup_clo_policy(spec, model, examples, groups, ref, a, device):
    """Ours (padded_full_head / none / padding_free / prefix_shared) through CLOPolicy and clo_loss."""
    from clo_fast.loss import clo_loss
    from clo_fast.model import apply_trainable_patterns, build_policy

    policy = build_policy(model, head_impl=a.impl)
    apply_trainable_patterns(policy, ATTN_ONLY)
    batches = clo_batches(spec.layout, examples, groups, a)
    body = sum(b.body_tokens for b in batches)
    head_rows = body if spec.full_head else sum(b.head_row_count for b in batches)
    sft_den = float(sum(int(b.response_tokens[:, 2].sum()) for b in batches))
    batches = [b.to(device) for b in batches]
    # full head: the padded batch through the head whole, labels [4B,T] as collate_clo makes them
    padded = padded_batches(examples, groups, a, device) if spec.full_head else None

    def micro_loss(i, g):
        b = batches[i]
        if spec.full_head:
            logps = policy(padded[i]["input_ids"], padded[i]["attention_mask"], padded[i]["labels"])
        else:
            logps = policy(b)
        count = b.response_tokens.to(logps.device)
        kw = {"sft_denominator": sft_den, "cl_denominator": 2.0 * len(examples), "validate": False}
        return clo_loss(logps.view(-1, 4), ref[g], count, BETA, LAM, **kw)[0]

    return common.accumulating(groups, micro_loss), policy, body, head_rows


def setup_trl_liger(spec, model, examples, groups, ref, a, device):
    """TRL DPOTrainer semantics: one backbone pass over the 4 sequences, Liger's fused linear DPO loss once per
    direction, the NLL on the target direction. The precomputed reference log-probs are a constant shift of the
    logits (no GEMM), so `ref` is not needed here."""
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from clo_fast.model import apply_trainable_patterns

    apply_trainable_patterns(model, ATTN_ONLY)
    with_nll = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=True, use_ref_model=False)
    dpo_only = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=False, use_ref_model=False)
    batches = padded_batches(examples, groups, a, device)
    tokens = sum(int(d["input_ids"].numel()) for d in batches)
    backbone, weight = model.model, model.lm_head.weight

    def first(out):  # Liger returns the loss alone or first in a tuple, by version
        return out[0] if isinstance(out, tuple) else out

    def micro_loss(i, g):
        d = batches[i]
        h = backbone(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).last_hidden_state
        y = d["labels"]
        # [chosen; rejected] per direction: English (0 vs 1) and target (2 vs 3, + NLL on 2)
        out_en = dpo_only(weight, torch.cat([h[0::4], h[1::4]]), torch.cat([y[0::4], y[1::4]]))
        out_tg = with_nll(weight, torch.cat([h[2::4], h[3::4]]), torch.cat([y[2::4], y[3::4]]))
        return (first(out_en) + first(out_tg)) * len(g) / len(examples)

    return common.accumulating(groups, micro_loss), model, tokens, tokens


def setup_materialized_logits(spec, model, examples, groups, ref, a, device):
    """[rows, T, V] logits and their log-softmax (clo_fast.loss.reference_clo_loss) on padded micro-batches."""
    from clo_fast.loss import reference_clo_loss
    from clo_fast.model import apply_trainable_patterns

    apply_trainable_patterns(model, ATTN_ONLY)
    batches = padded_batches(examples, groups, a, device)
    tokens = sum(int(d["input_ids"].numel()) for d in batches)
    sft_den = float(sum(int(d["response_tokens"][:, 2].sum()) for d in batches))

    def micro_loss(i, g):
        d = batches[i]
        logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
        kw = {"sft_denominator": sft_den, "cl_denominator": 2.0 * len(examples), "validate": False}
        return reference_clo_loss(logits, d["labels"], ref[g], BETA, LAM, **kw)[0]

    return common.accumulating(groups, micro_loss), model, tokens, tokens


VARIANTS = {
    "padded_full_head": Variant(setup_clo_policy, full_head=True),
    "none": Variant(setup_clo_policy),
    "padding_free": Variant(setup_clo_policy, layout="padding_free"),
    "prefix_shared": Variant(setup_clo_policy, layout="prefix_shared"),
    "trl_liger": Variant(setup_trl_liger, peer=True, needs_cuda="Liger's kernels"),
    "materialized_logits": Variant(setup_materialized_logits, peer=True),
}
PACKED = tuple(name for name, spec in VARIANTS.items() if spec.layout != "none")


def build_step(variant: str, model, examples: list[dict], ref, a, device):
    """(step callable → loss, micro-batch stats, its AdamW over the trainable parameters)."""
    import torch

    spec = VARIANTS[variant]
    groups = step_groups(variant, examples, a)
    step, module, body, head_rows = spec.setup(spec, model, examples, groups, ref, a, device)
    stats = {"micro_batches": len(groups), "body_tokens": body, "head_rows": head_rows}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    return step, stats, opt


# ------------------------------------------------------------------------------------------- measuring
def run_variant(variant: str, profile: str, a) -> dict:
    """One variant in this process: --warmup then --steps timed steps, the peak memory above the built model,
    the model FLOPs and MFU (and with --profile-split, one more step under the profiler)."""
    import torch

    device, dtype, needs = torch.device(a.device), getattr(torch, a.dtype), VARIANTS[variant].needs_cuda
    if needs and device.type != "cuda":
        raise RuntimeError(f"{variant} needs CUDA ({needs} are Triton GPU kernels)")
    examples, ref = step_inputs(profile, a, device, dtype)
    common.free_memory(a.device)
    common.sync(a.device)
    model = variant_model(variant, a, dtype, device)
    with common.peak_mib(a.device) as peak:
        step, stats, opt = build_step(variant, model, examples, ref, a, device)
        times, losses = common.timed_calls(with_optimizer(step, opt), a.warmup, a.steps, a.device)
    n = len(examples)
    res = {
        "body_tokens_per_example": round(stats["body_tokens"] / n, 2),
        "head_rows_per_example": round(stats["head_rows"] / n, 2),
        "step_ms": round(statistics.median(times), 2),
        "peak_mib": round(peak["mib"], 1),
        "step_ms_all": [round(t, 2) for t in times],
        "first_loss": losses[0],
        "micro_batches": stats["micro_batches"],
        "examples_per_step": n,
    }
    if a.profile_split:  # after the timed steps and the peak: the profiler's own cost is in neither
        res["profile_split"] = common.profile_split(step, opt, device.type == "cuda")
    res.update(common.mfu_fields(model, examples, statistics.median(times) / 1e3, device, dtype))
    del step, opt, model
    common.free_memory(a.device)
    return res


def host_build_ms(variant: str, examples: list[dict], a, repeats: int = 5) -> float | None:
    """Median wall time to build one step's micro-batches on the host (our variants): not part of step_ms
    (every variant's inputs are built before timing), reported next to it because the trainer builds them
    on the host every step."""
    spec = VARIANTS[variant]
    if spec.peer:
        return None
    build = lambda: clo_batches(spec.layout, examples, step_groups(variant, examples, a), a)  # noqa: E731
    return round(statistics.median(common.timed_calls(build, 0, repeats, "cpu")[0]), 2)


def interleaved_step_ms(variants: list[str], profile: str, a) -> dict:
    """CPU timing on a shared machine: every variant built in this one process, their steps run round-robin,
    the order rotated every round (common.rotating_rounds). Returns per variant {"step_ms" (median wall),
    p10/p90/min, "step_cpu_ms" (median CPU time of this process) and its spread, the per-round lists} or
    {"error"}; and under "_paired", per pair (mode, base): the median over rounds of base_ms / mode_ms within
    the same round (both steps saw the same load)."""
    import torch

    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    examples, ref = step_inputs(profile, a, device, dtype)
    runs, out = {}, {}
    for v in variants:
        try:
            step, _, opt = build_step(v, variant_model(v, a, dtype, device), examples, ref, a, device)
            runs[v] = with_optimizer(step, opt)
        except Exception as e:  # a variant failing is a result, not a crash
            out[v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    pairs = [(m, b) for m in PACKED + ("none",) for b in ("none", "padded_full_head") if m != b]
    extra = lambda v: {"host_build_ms": host_build_ms(v, examples, a)}  # noqa: E731
    return {**out, **common.interleaved_cases(runs, a.warmup, a.steps, pairs, extra)}


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
        for mode, base in [(m, b) for m in PACKED + ("none",) for b in ("none", "padded_full_head", "trl_liger")]:
            if mode in res and base in res and mode != base:
                m, b = res[mode], res[base]
                s[f"{mode}_speedup_vs_{base}"] = round(b["step_ms"] / m["step_ms"], 3)
                if "step_cpu_ms" in m and "step_cpu_ms" in b:
                    s[f"{mode}_cpu_time_speedup_vs_{base}"] = round(b["step_cpu_ms"] / m["step_cpu_ms"], 3)
                s[f"{mode}_peak_mib_vs_{base}"] = round(m["peak_mib"] / max(b["peak_mib"], 1e-9), 3)
        ours = [res[m]["first_loss"] for m in ("padded_full_head", "none") + PACKED if m in res]
        if len(ours) > 1:
            s["our_modes_first_loss_max_abs_diff"] = max(ours) - min(ours)
        out[profile] = s
    return out


def write_report(a, results: dict, errors: dict, out: Path, paired: dict | None = None) -> None:
    peak_kind = ("cuda max_memory_allocated above the model weights" if a.device == "cuda"
                 else "peak RSS of the variant's process above its RSS after building the model")  # fmt: skip
    common.write_json(out, {
        "benchmark": "bench_step", "issue": 10, "machine": machine_info(a.device), "device": a.device,
        "shape": a.shape, "model": SHAPES[a.shape], **{field: getattr(a, k) for field, k in REPORTED_FLAGS},
        "profiles": a.profiles.split(","), "trainable": "attention q/k/v/o only",
        "reference_logps": "precomputed (all variants)", "peak_mib_kind": peak_kind, "results": results,
        "summary": summarize(results), "paired_round_ratios": paired or {}, "errors": errors,
    })  # fmt: skip


def print_report(a, results: dict, paired: dict, errors: dict, out: Path) -> None:
    print(f"bench_step  {a.shape}  {a.device} {a.dtype}  {a.examples} examples/step  [{machine_info(a.device)}]")
    for profile, res in results.items():
        print(f"-- profile {profile}")
        print(
            f"{'variant':20} {'body tok/ex':>11} {'head rows/ex':>12} {'step ms':>9} {'p10-p90':>15} {'cpu ms':>8} "
            f"{'peak MiB':>9} {'micro':>5} {'loss@1':>9}"
        )
        for v, r in res.items():
            p10_p90 = f"{r['step_ms_p10']:.0f}-{r['step_ms_p90']:.0f}" if "step_ms_p10" in r else "-"
            cpu = f"{r['step_cpu_ms']:.1f}" if "step_cpu_ms" in r else "-"
            print(
                f"{v:20} {r['body_tokens_per_example']:11.1f} {r['head_rows_per_example']:12.1f} {r['step_ms']:9.1f} "
                f"{p10_p90:>15} {cpu:>8} {r['peak_mib']:9.1f} {r['micro_batches']:5d} {r['first_loss']:9.5f}"
            )
    print(json.dumps(summarize(results), indent=1))
    if paired:
        print(json.dumps(paired, indent=1))
    if errors:
        print("errors: " + ", ".join(errors))
    print(f"written: {out}")


# ------------------------------------------------------------------------------------ command line
def parse_args(argv=None):
    p = common.arg_parser(__doc__)
    add = p.add_argument
    # fmt: off
    add("--gpu", action="store_true", help="--device cuda --shape llama-3.2-1b --dtype bfloat16 --profiles oasst,demo")
    add("--shape", choices=sorted(SHAPES))
    add("--num-layers", type=int, help="the shape with this many layers (tests: every shape)")
    add("--device", choices=["cpu", "cuda"])
    add("--dtype", choices=["float32", "bfloat16"])
    add("--profiles", help="comma list of benchmarks/common.py LENGTH_PROFILES")
    add("--examples", type=int, help="examples per optimizer step (default 8 CPU / 16 GPU)")
    add("--micro", type=int, help="examples per padded micro-batch (default 2: the demo config)")
    add("--token-budget", type=int, help="body tokens per packed micro-batch (default 1024 CPU / 4096 GPU)")
    add("--split", choices=["trainer", "budget"], default="trainer",
        help="micro-batches as the trainer makes them (same count in every mode) or by --token-budget (packed)")
    add("--pad-to", type=int, help="padded length multiple (default 16 CPU / 64 GPU)")
    add("--attn", default="sdpa", help="attention implementation of our variants (padded_full_head/none/packed)")
    add("--peer-attn", default="sdpa", help="attention implementation of the peers")
    add("--stream-pad", type=int, default=1,
        help="packed stream length multiple (fewer shapes for compiled kernels, e.g. 512 with flex_attention)")
    add("--steps", type=int, help="timed steps (default 3 CUDA / 30 interleaved rounds CPU)")
    add("--warmup", type=int, help="untimed steps first (default 1 CUDA / 3 CPU)")
    add("--seed", type=int, default=0)
    add("--impl", default="auto", help="head impl for ours: auto | triton | torch")
    add("--variants", default=",".join(VARIANTS))
    add("--liger-body", action="store_true",
        help="Liger's RMSNorm/RoPE/SwiGLU kernels on every variant's body, as TRL's use_liger_kernel (CUDA)")
    add("--profile-split", action="store_true",
        help="one more step per variant under torch.profiler, its time split by category (attention, body GEMMs, "
        "head, optimizer, other, idle) in the JSON")
    add("--out", help="JSON path (default benchmarks/results/bench_step_<shape>_<device>.json)")
    # fmt: on
    common.add_child_flags(p)
    a = p.parse_args(argv)
    unknown = [v for v in a.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    if a.gpu:
        a.device = a.device or "cuda"
        common.fill_defaults(a, {k: DEVICE_DEFAULTS["cuda"][k] for k in ("shape", "dtype", "profiles")})
    a.device = a.device or "cpu"
    common.fill_defaults(a, {**DEVICE_DEFAULTS[a.device], "micro": 2}, keep_zero=("warmup",))  # --warmup 0: none
    if a.num_layers is not None:  # the shape's widths and head, fewer layers
        SHAPES[a.shape] = {**SHAPES[a.shape], "num_hidden_layers": a.num_layers}
    return a


def main(argv=None) -> int:
    common.apply_tma_request()
    a = parse_args(argv)
    if a.child:
        return common.child_main(a, lambda v, pr: run_variant(v, pr, a),
                                 lambda vs, pr: interleaved_step_ms(vs, pr, a), "bench_step")  # fmt: skip
    out = Path(a.out) if a.out else common.results_path(f"bench_step_{a.shape}_{a.device}.json")
    results, errors, paired = {pr: {} for pr in a.profiles.split(",")}, {}, {}
    variants = []
    for v in (v for v in a.variants.split(",") if v):
        if VARIANTS[v].needs_cuda and a.device != "cuda":
            errors[v] = f"skipped: {VARIANTS[v].needs_cuda} need CUDA"  # recorded, not run
        else:
            variants.append(v)
    go = common.child_launcher(__file__, common.flags_of(a, CHILD_FLAGS, ("profile_split", "liger_body")))
    common.run_variant_children(a, variants, go, results, errors, lambda: write_report(a, results, errors, out),
                                "bench_step")  # fmt: skip
    if a.device != "cuda" and variants:
        paired = common.run_interleaved_child(a, variants, go, results, errors)
        write_report(a, results, errors, out, paired)
    print_report(a, results, paired, errors, out)
    return 0 if all(e.startswith("skipped") for e in errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
