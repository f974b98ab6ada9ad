"""Run configuration: one YAML file per run, validated at start-up.

Every section is a dataclass; every field has a default and a comment saying what it does. Loading
rejects unknown keys and wrong types with an error that names the file and the dotted field
(`configs/x.yaml: clo.beta: must be > 0, got -1`). Sections are owned by the module that uses them,
but live here so that one file documents a whole run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names file and field."""


# ----------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    name_or_path: str = "demo"  # hub name or local path; "demo" = the tiny Llama built from the demo data
    dtype: str = "float32"  # weights/compute dtype: float32 | bfloat16 | float16; must agree with train.precision
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the `gpu` extra)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # Modules whose parameters train (fnmatch patterns on parameter names, e.g. model.layers.0.self_attn.q_proj.weight;
    # a tied head/embedding trains when any of its names matches); attention-only by default.
    trainable_patterns: list[str] = field(
        default_factory=lambda: ["*self_attn.q_proj*", "*self_attn.k_proj*", "*self_attn.v_proj*", "*self_attn.o_proj*"]
    )


@dataclass
class DataConfig:
    source: str = "demo"  # "demo" (bundled), a HF dataset name, or a local .json/.jsonl/.parquet/.csv
    source_format: str = "pairs"  # pairs (instruction/response fields) | oasst (message trees, as oasst1)
    split: str = "train"  # split of a HF dataset
    source_config: str | None = None  # config (subset) name of a HF dataset
    instruction_field: str = "instruction"  # field holding the English prompt
    response_field: str = "response"  # field holding the English response
    source_lang: str = "en"
    target_lang: str = "ko"  # ISO 639-1 code of the target language ℓ
    max_examples: int | None = None  # keep at most this many source pairs (seeded selection)
    seed: int = 0  # selection / shuffling seed
    translator: str = "columns"  # columns (translations already in the data) | hf (a seq2seq model)
    translation_model: str = "facebook/m2m100_1.2B"  # for translator=hf
    target_instruction_field: str = "instruction_{lang}"  # for translator=columns; {lang} = target_lang
    target_response_field: str = "response_{lang}"  # for translator=columns; {lang} = target_lang
    translation_batch_size: int = 16
    translation_max_length: int = 512  # model tokens per translated piece; longer texts are split
    translation_num_beams: int = 4  # beam search width for translator=hf (part of the cache key)
    translation_device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 ...
    translation_dtype: str = "auto"  # auto (bf16/fp16 on cuda, fp32 elsewhere) | float32 | bfloat16 | float16
    cache_dir: str = "~/.cache/clo_fast"  # translation cache and tokenized-data cache
    template: str = "plain"  # plain (instruction/response template, base models) | chat (tokenizer's chat template)
    prompt_template: str = "### Instruction:\n{instruction}\n\n### Response:\n"  # for template=plain
    max_length: int = 512  # tokens per sequence (prompt + response + EOS)
    eval_fraction: float = 0.05  # held-out share for eval loss and evaluation prompts
    on_bad_record: str = "error"  # error | skip (skipped records are counted in the summary)
    output_dir: str = "outputs/data"  # where the text-level dataset is saved


@dataclass
class CLOConfig:
    mode: str = "clo"  # clo (L = λ·L_SFT + (1-λ)·L_CL) | sft (λ = 1 baseline, no reference pass) | dpo (λ = 0)
    beta: float = 0.1  # DPO temperature β
    lam: float = 0.5  # λ, weight of the target-language NLL (mode clo only)
    reference_free: bool = False  # drop the π_ref terms (no reference pass)
    sft_sequences: list[int] = field(default_factory=lambda: [2])  # sequences the NLL covers (sft mode: [0, 2] = both languages)


@dataclass
class OptimConfig:
    lr: float = 5e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only; biases/norms get 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW β1, β2
    eps: float = 1e-8  # AdamW ε
    warmup_steps: int = 0  # linear warmup over this many optimizer steps
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr × this
    max_grad_norm: float = 1.0  # clipping of the global gradient norm; 0 disables
    epochs: int = 1  # passes over the training split (when max_steps is null)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    micro_batch_examples: int = 1  # examples (x4 sequences) per micro-batch per rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (global batch = micro × accum × ranks)
    seed: int = 0  # seeds the data order and all RNGs


@dataclass
class TrainConfig:
    precision: str = "fp32"  # fp32 | bf16 | fp16 (DeepSpeed mixed precision; model.dtype must match)
    deepspeed_config: str = "configs/ds_zero3.json"  # ZeRO-3 JSON; batch sizes, precision, clipping filled from here
    output_dir: str = "outputs/run"  # checkpoints/, hf_model/, metrics.jsonl, tensorboard/, ref_data/
    logging_steps: int = 1  # metrics to console/JSONL/TensorBoard every N steps (the only host syncs)
    eval_steps: int = 0  # eval loss on the held-out split every N steps; 0 = only at the end
    save_steps: int = 0  # DeepSpeed checkpoint every N steps; 0 = only at the end
    save_total_limit: int = 2  # keep this many checkpoints
    export_hf: bool = True  # write an HF model (16-bit gathered weights) to <output_dir>/hf_model at the end
    tensorboard: bool = True  # also log to <output_dir>/tensorboard
    head_impl: str = "auto"  # auto | triton | torch (chunked fallback) | reference (materialized logits)
    pad_to_multiple_of: int = 64  # batch sequence length is padded up to a multiple of this
    run_evaluation: bool = False  # run clo_fast.evaluate on base vs trained at the end (rank 0)


@dataclass
class EvalConfig:
    max_prompts: int = 32  # held-out prompts per language (from the text dataset's "eval" split)
    max_new_tokens: int = 64  # greedy decoding length cap per response
    batch_size: int = 8  # prompts per generation / reference-NLL batch
    detector_languages: list[str] = field(default_factory=list)  # extra language-ID candidates (ISO 639-1) beyond the defaults
    judge_endpoint: str | None = None  # OpenAI-compatible base URL (…/v1) for the optional LLM judge; null = skipped
    judge_model: str | None = None  # model name sent to the judge endpoint
    judge_baseline: str | None = None  # model label the others are judged against (default: the first --model)
    judge_api_key_env: str | None = "OPENAI_API_KEY"  # env var holding the judge's API key (sent only if set)
    judge_timeout_s: float = 60.0  # per judge request
    output_dir: str = "outputs/eval"  # report.json, report.md, report.png, generations.jsonl


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clo: CLOConfig = field(default_factory=CLOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, where: str = "<config>") -> "RunConfig":
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {name}: {msg}")

        check(self.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {self.model.dtype!r}")
        check(self.clo.mode in ("clo", "sft", "dpo"), "clo.mode", f"must be clo|sft|dpo, got {self.clo.mode!r}")
        check(self.clo.beta > 0, "clo.beta", f"must be > 0, got {self.clo.beta}")
        check(0.0 <= self.clo.lam <= 1.0, "clo.lam", f"must be in [0, 1], got {self.clo.lam}")
        check(all(s in (0, 1, 2, 3) for s in self.clo.sft_sequences), "clo.sft_sequences", "entries must be 0..3")
        check(self.optim.lr > 0, "optim.lr", f"must be > 0, got {self.optim.lr}")
        check(self.optim.micro_batch_examples >= 1, "optim.micro_batch_examples", "must be >= 1")
        check(self.optim.gradient_accumulation_steps >= 1, "optim.gradient_accumulation_steps", "must be >= 1")
        check(self.optim.schedule in ("cosine", "linear", "constant"), "optim.schedule", f"unknown {self.optim.schedule!r}")
        check(len(self.optim.betas) == 2 and all(0.0 <= b < 1.0 for b in self.optim.betas), "optim.betas",
              f"must be two numbers in [0, 1), got {self.optim.betas}")
        check(self.optim.eps > 0, "optim.eps", f"must be > 0, got {self.optim.eps}")
        check(self.optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.optim.weight_decay}")
        check(self.optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.optim.warmup_steps}")
        check(0.0 <= self.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.optim.min_lr_ratio}")
        check(self.optim.max_grad_norm >= 0, "optim.max_grad_norm", f"must be >= 0 (0 disables), got {self.optim.max_grad_norm}")
        check(self.optim.epochs >= 1, "optim.epochs", f"must be >= 1, got {self.optim.epochs}")
        check(self.optim.max_steps is None or self.optim.max_steps >= 1, "optim.max_steps",
              f"must be >= 1 or null, got {self.optim.max_steps}")
        check(len(self.model.trainable_patterns) > 0, "model.trainable_patterns", "must list at least one pattern")
        check(self.model.attn_implementation in ("sdpa", "eager", "flash_attention_2"), "model.attn_implementation",
              f"must be sdpa|eager|flash_attention_2, got {self.model.attn_implementation!r}")
        check(len(set(self.clo.sft_sequences)) == len(self.clo.sft_sequences) and len(self.clo.sft_sequences) > 0,
              "clo.sft_sequences", f"must be non-empty without repeats, got {self.clo.sft_sequences}")
        check(self.train.logging_steps >= 1, "train.logging_steps", "must be >= 1")
        check(self.train.eval_steps >= 0, "train.eval_steps", "must be >= 0")
        check(self.train.save_steps >= 0, "train.save_steps", "must be >= 0")
        check(self.train.save_total_limit >= 1, "train.save_total_limit", "must be >= 1")
        check(self.train.pad_to_multiple_of >= 1, "train.pad_to_multiple_of", "must be >= 1")
        want = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(self.train.precision)
        check(want is None or self.model.dtype == want, "train.precision",
              f"{self.train.precision} needs model.dtype: {want} (got {self.model.dtype})")
        check(self.train.precision in ("fp32", "bf16", "fp16"), "train.precision", f"unknown {self.train.precision!r}")
        check(self.train.head_impl in ("auto", "triton", "torch", "reference"), "train.head_impl", f"unknown {self.train.head_impl!r}")
        check(self.data.template in ("plain", "chat"), "data.template", f"must be plain|chat, got {self.data.template!r}")
        check(self.data.translator in ("columns", "hf"), "data.translator", f"must be columns|hf, got {self.data.translator!r}")
        check(self.data.source_format in ("pairs", "oasst"), "data.source_format", f"must be pairs|oasst")
        check(self.data.on_bad_record in ("error", "skip"), "data.on_bad_record", "must be error|skip")
        check(self.data.max_length >= 8, "data.max_length", f"must be >= 8, got {self.data.max_length}")
        check(0.0 <= self.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
        return self


# ------------------------------------------------------------------------------- generic machinery
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def parse_dataclass(cls: type, raw: Any, where: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields.

    Unknown keys and wrong types raise ConfigError naming `where` (the file) and the dotted field.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or '<top level>'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: {prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = parse_dataclass(tp, value, where, f"{prefix}{name}.")
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}: {prefix}{name}: expected {tp}, got {value!r}")
        kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read, merge dotted `overrides` ({"clo.beta": 0.2}), parse and validate a run config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_dataclass(RunConfig, raw, str(path)).validate(str(path))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
