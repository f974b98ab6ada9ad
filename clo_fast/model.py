"""Model loading for CLO training: ZeRO-3 partitioned from the start, frozen but for the configured modules,
with the LM head replaced by a head module that computes per-sequence log-probs through the fused kernel.

    policy = load_policy(cfg.model, dtype=torch.bfloat16, ds_config=ds_cfg, head_impl="auto")
    logps = policy(input_ids, attention_mask, labels)      # [S] fp32: Σ_t log p(labels[s,t])

`CLOPolicy` has the two children of a `*ForCausalLM` under the same names — `model` (the backbone, which
returns hidden states, never logits) and `lm_head` (`FusedLogprobHead`, owning the head weight) — so its
state-dict keys are exactly the HF model's and DeepSpeed's `save_16bit_model` writes a file that
`AutoModelForCausalLM.from_pretrained` loads.

ZeRO-3 (docs/DESIGN.md §4): a parameter read outside its module's forward is an empty shard. The head weight is
therefore only read inside `FusedLogprobHead.forward`, where DeepSpeed's module hooks have gathered it
(and release it afterwards). With tied embeddings the head owns the *same* Parameter as
`model.embed_tokens`; ZeRO-3 keeps shared parameters shared (one ds_id).

Imports of deepspeed happen only when a DeepSpeed config is given: the benchmark loads models without it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass, field

import torch
from torch import nn

from clo_fast.attention import ATTENTION_BACKENDS, PACKED_SDPA, attention_inputs, use_packed_sdpa
from clo_fast.config import ConfigError, LoraSettings, ModelConfig
from clo_fast.packing import PackedBatch
from clo_fast.pretrained import resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------- head
class FusedLogprobHead(nn.Module):
    """LM head that returns per-sequence label log-prob sums instead of logits.

    Owns `weight` [V,H] (the HF `lm_head.weight`, possibly tied to the input embeddings). forward(hidden
    [S,T,H], labels [S,T] aligned with the rows they score) -> [S] fp32 via `clo_fast.ops.sequence_logprobs`,
    which never materializes [S·T, V] logits (except impl="reference").
    """

    def __init__(self, weight: nn.Parameter, impl: str = "auto"):
        super().__init__()
        self.weight = weight
        self.impl = impl

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        rows: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        num_seqs: int | None = None,
    ) -> torch.Tensor:
        """Padded: hidden [S,T,H], labels [S,T] -> [S]. Labelled rows only (`clo_fast.packing`): hidden [M,H]
        (any layout, flattened), rows [N] into it, labels/seq_ids [N] -> [num_seqs]; the head's GEMMs then
        cost N rows instead of M, and index_select's backward adds a row's gradients when it is used twice."""
        from clo_fast.ops import packed_sequence_logprobs, sequence_logprobs

        weight = self.weight
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        if rows is not None:
            return packed_sequence_logprobs(
                hidden.index_select(0, rows), weight, labels, seq_ids, num_seqs, impl=self.impl
            )
        return sequence_logprobs(hidden, weight, labels, impl=self.impl)

    def extra_repr(self) -> str:
        shape = tuple(getattr(self.weight, "ds_shape", self.weight.shape))
        return f"weight={shape}, impl={self.impl!r}"


class CLOPolicy(nn.Module):
    """Backbone + fused head. Children named like a *ForCausalLM (`model`, `lm_head`) so state dicts match."""

    def __init__(self, backbone: nn.Module, head: FusedLogprobHead, config, generation_config=None):
        super().__init__()
        self.model = backbone
        self.lm_head = head
        self.config = config
        self.generation_config = generation_config

    def forward(
        self, input_ids, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """policy(input_ids, attention_mask, labels) on a padded batch, or policy(batch) on a
        `clo_fast.packing.PackedBatch` (any packing mode; only labelled rows reach the head). Both -> [4B]."""
        if isinstance(input_ids, PackedBatch):
            return packed_sequence_logps(self, input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.lm_head(hidden, labels)


# ------------------------------------------------------------------------------ packed forward
def attn_implementation_of(policy) -> str:
    """The model's attention backend ("clo_packed_sdpa" is sdpa: `use_packed_sdpa`)."""
    cfg = getattr(policy, "config", None)
    attn = getattr(cfg, "_attn_implementation", None) or "sdpa"
    return "sdpa" if attn == PACKED_SDPA else attn


def backbone_hidden_rows(policy, batch: PackedBatch, attn_implementation: str | None = None) -> torch.Tensor:
    """Run the backbone once on the batch: hidden states flattened to [L or 4B·T, H]."""
    attn = attn_implementation or attn_implementation_of(policy)
    param = next(policy.model.parameters())
    kwargs = attention_inputs(batch, attn, dtype=param.dtype if param.is_floating_point() else torch.float32)
    if "clo_windows" in kwargs:
        use_packed_sdpa(policy.model)
    out = policy.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.reshape(-1, hidden.shape[-1])


def packed_sequence_logps(policy, batch: PackedBatch, attn_implementation: str | None = None) -> torch.Tensor:
    """Per-sequence log-prob sums [4B] fp32 (row 4b+k = example b, sequence k) from one backbone pass and a
    head pass over exactly the labelled rows: hidden[head_rows] → FusedLogprobHead (rows gathered inside
    the head module's forward, where ZeRO-3 has gathered its weight)."""
    hidden = backbone_hidden_rows(policy, batch, attn_implementation)
    return policy.lm_head(
        hidden, batch.head_labels, rows=batch.head_rows, seq_ids=batch.head_seq_ids, num_seqs=batch.num_seqs
    )


# -------------------------------------------------------------------------------------- freezing
@dataclass
class TrainableInfo:
    names: list[str] = field(default_factory=list)  # names of trainable params (first name of shared ones)
    trainable: int = 0  # elements
    total: int = 0


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 params are empty shards locally


def apply_trainable_patterns(module: nn.Module, patterns: list[str]) -> TrainableInfo:
    """requires_grad = True exactly for parameters whose name (any of its names, when shared/tied)
    matches one of the fnmatch `patterns`; everything else is frozen. Raises ConfigError if none match."""
    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        params[id(p)] = p
    info = TrainableInfo()
    for pid, p in params.items():
        names = names_of[pid]
        on = any(fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns)
        p.requires_grad_(on)
        info.total += _numel(p)
        if on:
            info.trainable += _numel(p)
            info.names.append(names[0])
    if not info.names:
        sample = ", ".join(n for n, _ in list(module.named_parameters())[:6])
        raise ConfigError(f"model.trainable_patterns: {patterns} match no parameter (names look like: {sample}, ...)")
    return info


# ------------------------------------------------------------------------------- start-up guards
# HF config fields that change logits after `hidden @ lm_head.weightᵀ`, which the fused head does not compute:
# (field, the value that means "no change")
_HEAD_CONFIG_FIELDS = (
    ("final_logit_softcapping", None),  # Gemma-2/3: tanh soft-capping of the logits
    ("logit_scale", 1.0),  # Cohere: logits × logit_scale
    ("logits_scaling", 1.0),  # Granite: logits ÷ logits_scaling
)


def check_fused_head_supported(hf_model, where: str = "") -> None:
    """Raise ConfigError when the model's logits are not exactly `hidden @ lm_head.weightᵀ` (an LM-head bias,
    logit scaling, final-logit soft-capping): the fused head would train on wrong log-probs."""
    name = where or getattr(getattr(hf_model, "config", None), "_name_or_path", "") or type(hf_model).__name__
    head = hf_model.get_output_embeddings()
    problems = []
    if not isinstance(head, nn.Linear):
        problems.append(f"its output layer is a {type(head).__name__}, not a linear layer")
    elif head.bias is not None:
        problems.append("its LM head has a bias (lm_head.bias)")
    config = hf_model.config
    for cfg in (config, getattr(config, "text_config", None)):
        for fld, neutral in _HEAD_CONFIG_FIELDS:
            value = getattr(cfg, fld, None) if cfg is not None else None
            if value is not None and value != neutral:
                problems.append(f"config.{fld} = {value}")
    if problems:
        raise ConfigError(
            f"model {name!r} ({type(hf_model).__name__}): the fused LM head computes log-probs from "
            f"hidden @ lm_head.weightᵀ only, but {'; '.join(dict.fromkeys(problems))}: training would use wrong "
            "log-probs. Use a model whose logits are a plain projection."
        )


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere, as in the reference pass (which runs in eval mode), so the step-0 policy equals its
    own reference: dropout layers get p = 0, and attention modules' dropout rates (read only in train mode, e.g.
    Llama's `attention_dropout`) are set to 0. The config is left as it is: the exported model keeps its rates."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if ("dropout" in attr or "pdrop" in attr) and isinstance(value, float):
                setattr(module, attr, 0.0)


# ------------------------------------------------------------------------------------------- LoRA
LORA_PARAMETER_PATTERNS = ("*.lora_A.*", "*.lora_B.*")  # the adapter weights PEFT injects (adapter "default")


def lora_target_modules(hf_model: nn.Module, lora: LoraSettings) -> list[str]:
    """Full names of the nn.Linear modules matching `lora.target_patterns`. The LM head is never a target: the
    fused head reads its weight directly, so an adapter on it would be bypassed."""
    names = [
        name
        for name, mod in hf_model.named_modules()
        if isinstance(mod, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in lora.target_patterns)
    ]
    head = hf_model.get_output_embeddings()
    head_names = [n for n in names if hf_model.get_submodule(n) is head]
    if head_names:
        raise ConfigError(f"model.lora.target_patterns: {lora.target_patterns} match the LM head ({head_names[0]})")
    if not names:
        sample = ", ".join(n for n, m in hf_model.named_modules() if isinstance(m, nn.Linear))[:300]
        raise ConfigError(
            f"model.lora.target_patterns: {lora.target_patterns} match no nn.Linear module (names look like: {sample})"
        )
    return names


def peft_lora_config(lora: LoraSettings, target_modules: list[str], base_model: str | None = None):
    """The PEFT LoraConfig for our settings (also written next to the exported adapter)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def add_lora_adapters(hf_model: nn.Module, lora: LoraSettings) -> list[str]:
    """Inject LoRA adapters (PEFT) into `hf_model` in place; returns the adapted module names.

    lora_B starts at zero, so the adapted model computes exactly the base model until the first update: the
    reference pass at step 0 scores the base model. Under ZeRO-3 the base weights are already partitioned
    (the adapter layers only read in/out_features); DeepSpeed partitions the new adapter weights in
    `deepspeed.initialize`. Parameter names gain `.base_layer.` and `.lora_{A,B}.default.`."""
    from peft import inject_adapter_in_model

    targets = lora_target_modules(hf_model, lora)
    inject_adapter_in_model(peft_lora_config(lora, targets), hf_model)
    return targets


def causal_lm(policy: CLOPolicy) -> nn.Module:
    """The *ForCausalLM the policy was split from (same parameters; generation goes through it). Kept outside
    the module tree, so state dicts and DeepSpeed see each parameter once."""
    return policy.__dict__["_causal_lm"]


def apply_lora_trainable(module: nn.Module) -> TrainableInfo:
    """Only the adapter weights train; everything else (base weights, embeddings, the fused head) is frozen."""
    return apply_trainable_patterns(module, list(LORA_PARAMETER_PATTERNS))


# --------------------------------------------------------------------------------------- loading
def _check_attn(attn: str) -> None:
    backend = ATTENTION_BACKENDS.get(attn)
    if backend is not None and backend.requires and importlib.util.find_spec(backend.requires[0]) is None:
        raise ConfigError(f"model.attn_implementation: {attn} needs {backend.requires[1]}; use sdpa")


def load_hf_model(path: str, cfg: ModelConfig, dtype: torch.dtype, ds_config: dict | None = None):
    """from_pretrained; with a ZeRO-3 `ds_config` the weights are partitioned while loading
    (transformers enters deepspeed.zero.Init through HfDeepSpeedConfig): no full copy per rank.
    Returns (hf_model, keepalive) — keep `keepalive` referenced while the model lives."""
    from transformers import AutoModelForCausalLM

    _check_attn(cfg.attn_implementation)
    keepalive = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weakref to it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    return model, keepalive


def build_policy(hf_model, head_impl: str = "auto", gradient_checkpointing: bool = False) -> CLOPolicy:
    """Split an HF *ForCausalLM into backbone + fused head (the head owns the same weight Parameter)."""
    backbone = getattr(hf_model, hf_model.base_model_prefix, None) or hf_model.model
    head_weight = hf_model.get_output_embeddings().weight
    if gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_model.config.use_cache = False
    policy = CLOPolicy(
        backbone,
        FusedLogprobHead(head_weight, head_impl),
        hf_model.config,
        getattr(hf_model, "generation_config", None),
    )
    policy.__dict__["_causal_lm"] = hf_model  # not a child module: see causal_lm()
    return policy


def load_policy(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    ds_config: dict | None = None,
    head_impl: str = "auto",
    cache_dir: str = "~/.cache/clo_fast",
):
    """Load, split and freeze. Returns (policy, info: TrainableInfo, path, keepalive)."""
    path = resolve_model_path(cfg.name_or_path, cache_dir, cfg.gguf_file)
    dtype = dtype or DTYPES[cfg.dtype]
    hf_model, keepalive = load_hf_model(path, cfg, dtype, ds_config)
    check_fused_head_supported(hf_model, path)
    if cfg.lora is not None:
        add_lora_adapters(hf_model, cfg.lora)
    disable_dropout(hf_model)  # after the adapters: their dropout goes off too, as TRL's disable_dropout does
    policy = build_policy(hf_model, head_impl, cfg.gradient_checkpointing)
    info = (
        apply_lora_trainable(policy)
        if cfg.lora is not None
        else apply_trainable_patterns(policy, cfg.trainable_patterns)
    )
    policy.train()
    return policy, info, path, keepalive
