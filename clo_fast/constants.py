"""Facts shared by several modules, stated once."""

from __future__ import annotations

# Label value that marks a position as not scored (prompt tokens, padding); the PyTorch convention.
IGNORE_INDEX = -100

# Every CLO example is four sequences, in this order (docs/DESIGN.md §1); batch row 4b+k = example b, sequence k.
SEQUENCES_PER_EXAMPLE = 4
SEQUENCE_KINDS = ("en_en", "en_tgt", "tgt_tgt", "tgt_en")  # (prompt language, response language)

# The allowed values of config fields that more than one module reads (the validator in clo_fast/config.py and
# the code that acts on them), each stated once here.
CLO_MODES = ("clo", "sft", "dpo")  # clo.mode (training/step.py maps a mode to λ and the sequences it runs)
LOSS_TYPES = ("sigmoid", "ipo")  # clo.loss_type (loss.preference_loss)
SOURCE_FORMATS = ("pairs", "oasst", "messages")  # data.source_format (data/sources.py reads each)
# train.report_to: logger name → the package it needs (None: none); training/metrics.py's LOGGERS implements each
REPORTERS = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# How micro-batches lay out tokens (train.packing; clo_fast/packing.py describes each layout), slowest to fastest.
PACKING_MODES = ("none", "padding_free", "prefix_shared")
TEMPLATES = ("plain", "chat")  # data.template (data/tokenize.py renders each)
BAD_RECORD_ACTIONS = ("error", "skip")  # data.on_bad_record (data/sources.py)
TRANSLATORS = ("columns", "hf")  # data.translator (data/translate.py)
# optim.lr_scheduler_type: TRL's / transformers' names, built by transformers.get_scheduler (training/optim.py)
LR_SCHEDULER_TYPES = ("linear", "cosine", "cosine_with_min_lr", "constant_with_warmup")
BENCHMARK_CHAT_TEMPLATE_MODES = ("auto", "always", "never")  # eval.benchmark_chat_template (evaluate/benchmarks.py)
DEVICE_MAPS = ("auto",)  # eval.device_map besides null (accelerate's sharding over every visible GPU)
# train.head_impl (besides auto): the LM-head implementations, ops.HEAD_IMPLS implements each
HEAD_IMPLS = ("triton", "torch", "reference")

# The default trainable modules: attention projections only (the CLO paper's setting).
ATTENTION_ONLY_PATTERNS = ("*self_attn.q_proj*", "*self_attn.k_proj*", "*self_attn.v_proj*", "*self_attn.o_proj*")
# The paper's ablation of which layers train (Llama/Qwen/Mistral module names): attention only, MLP only, or
# every weight of the decoder layers (attention, MLP and their norms; embeddings and head stay frozen).
LAYER_ABLATION_PATTERNS = {
    "attention": ATTENTION_ONLY_PATTERNS,
    "mlp": ("*mlp.gate_proj*", "*mlp.up_proj*", "*mlp.down_proj*"),
    "all": ("*layers.*",),
}

# DeepSpeed precision mode ↔ model.dtype name (the one place precision names are mapped).
PRECISION_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

DEFAULT_CACHE_DIR = "~/.cache/clo_fast"
DEMO_LANGS = ("ko", "sw")  # target languages the bundled demo data carries translations for

# any one of these in a model folder means a tokenizer was saved there (checked before a model loads)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
# model.name_or_path / data.source naming the miniature fact world (clo_fast/world.py), and its target language
WORLD_NAME = "world"
WORLD_TARGET_LANG = "sw"
# Size limits, checked before any long work. One text of a record (an instruction, a response, a turn): longer is
# a bad record (data.on_bad_record), never tokenized (a 40M-character record stalled tokenization for > 10 min at
# 5.7 GB). 200,000 characters is ~50k tokens, far beyond any data.max_length.
MAX_RECORD_TEXT_CHARS = 200_000
# One string of the run config (run_name, a system prompt, a template, a path ...): it is written into config.yaml,
# every checkpoint and the model card.
MAX_CONFIG_STRING_CHARS = 10_000
