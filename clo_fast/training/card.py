"""The model card (README.md) of an exported model or LoRA adapter, as a Hub user expects one: metadata (base
model, languages, Hub datasets, library, license), the method with its λ/β and the paper, the data, the training
settings, the evaluation table, the final metrics, versions, a usage snippet, the license and a citation.

Nothing local goes into a card: a local base model, data file or output folder is named by its last path part
only, and Hub metadata lists Hub names only."""

from __future__ import annotations

import json
from pathlib import Path

from clo_fast.config import RunConfig
from clo_fast.constants import WORLD_NAME
from clo_fast.paths import looks_local

CARD_FILE = "README.md"
SUMMARY_FILE = "clo_training_summary.json"  # the run's record beside the export (local paths: never uploaded)
PAPER_URL = "https://arxiv.org/abs/2505.14297"  # the Hub links a card citing arxiv.org/abs/<id> to the paper page
CITATION = """@inproceedings{lee-etal-2025-cross,
  title = {Cross-Lingual Optimization for Language Transfer in Large Language Models},
  author = {Lee, Jungseob and Hong, Seongtae and Moon, Hyeonseok and Lim, Heuiseok},
  booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics
               (Volume 1: Long Papers)},
  year = {2025},
  address = {Vienna, Austria},
  publisher = {Association for Computational Linguistics},
  pages = {15100--15119},
  url = {https://aclanthology.org/2025.acl-long.734/}
}"""
# the final metrics a card shows (training and held-out), sorted by name; fidelity/<lang> are added when logged
CARD_METRICS = (
    "loss",
    "nll",
    "cl_loss",
    "rewards/accuracies",
    "rewards/margins",
    "eval/loss",
    "eval/nll",
    "eval/rewards/accuracies",
)


def _hub_name(name: str) -> str | None:
    """`name` when it names something on the Hub (owner/name or name), None for the built-in sources and for local
    files and folders."""
    if name in ("demo", WORLD_NAME) or looks_local(name) or Path(name).expanduser().exists():
        return None
    return name


def _shown(name: str) -> str:
    """How a card names a model or data source: a Hub name as it is; a built-in one by its name; a local path by
    its last part only (a card is public: no home folders, no user names)."""
    if name in ("demo", WORLD_NAME) or _hub_name(name):
        return name
    return f"{Path(name).name} (a local file or folder)"


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for package in ("clo-fast", "torch", "transformers", "deepspeed", "peft", "huggingface_hub"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def final_metrics_rows(final: dict) -> list[tuple[str, float]]:
    """The card's short table: the headline metrics that were logged, and fidelity per language, sorted."""
    keep = [k for k in final if (k in CARD_METRICS or k.startswith("fidelity/")) and isinstance(final[k], (int, float))]
    return [(k, float(final[k])) for k in sorted(keep)]


def _usage(cfg: RunConfig, repo: str, base_repo: str, adapter: bool) -> list[str]:
    d = cfg.data
    example = f"<a question in {d.target_lang}>"
    if adapter:
        load = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_repo}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")  # or model.merge_and_unload() for a plain model',
            f'tokenizer = AutoTokenizer.from_pretrained("{base_repo}")',
        ]
    else:
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
    if d.template == "chat":
        prompt = [
            f'messages = [{{"role": "user", "content": "{example}"}}]',
            "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
        ]
    else:  # the plain template the model was trained on
        prompt = [f"prompt = {json.dumps(d.prompt_template)}.format(instruction={json.dumps(example)})"]
    run = [
        'inputs = tokenizer(prompt, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=256)",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
    ]
    return ["```python", *load, *prompt, *run, "```"]


def model_card_text(
    cfg: RunConfig, summary: dict, evaluation_markdown: str | None = None, library: str = "transformers"
) -> str:
    """README.md for the exported model (`library` transformers) or its LoRA adapter (`library` peft)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    adapter = library == "peft"
    base = str(summary.get("base_model", m.name_or_path))
    base_hub = _hub_name(m.name_or_path) and _hub_name(base)
    sources = _sources(cfg)
    langs = list(d.target_langs) or [d.target_lang]
    tgt = ", ".join(langs)
    metadata = _metadata(cfg, base_hub, sources, langs, library)
    repo = t.push_to_hub or "path/to/hf_model"
    this = f"{repo}-adapter" if adapter and t.push_to_hub else ("path/to/hf_adapter" if adapter else repo)
    base_shown = f"`{base_hub}`" if base_hub else f"`{_shown(m.name_or_path)}`"
    base_repo = base_hub or "path/to/base_model"
    title = (t.push_to_hub or Path(t.output_dir).name).split("/")[-1]
    lines = ["---", metadata, "---", "", f"# {title}", ""]
    if adapter:
        lines += [
            f"**A LoRA adapter** (PEFT), not a full model: load it on top of its base model {base_shown} (see "
            "Usage). " + (f"The same weights merged into a plain model: `{repo}`." if t.push_to_hub else "")
        ]
    else:
        lines += [f"{base_shown} fine-tuned for **{tgt}** with Cross-Lingual Optimization (CLO)."]
    lines += _method_section(cfg, tgt, adapter)
    lines += _data_section(cfg, sources, tgt, summary.get("data") or {})
    lines += _training_section(cfg, summary)
    if evaluation_markdown:
        lines += ["", "## Evaluation: base vs trained", "", evaluation_markdown.strip()]
    rows = final_metrics_rows(summary.get("final_metrics") or {})
    if rows:
        lines += ["", "## Final training metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in rows]
    versions = _versions()
    lines += ["", "## Versions", "", "| package | version |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in versions.items()]
    lines += ["", "## Usage", "", *_usage(cfg, this, base_repo, adapter)]
    lines += _license_and_citation(t.hub_license)
    return "\n".join(lines) + "\n"


def _sources(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(source, format, translator) of each dataset: data.sources (a mix) names every one."""
    d = cfg.data
    return [(s.source, s.source_format or d.source_format, s.translator or d.translator) for s in d.sources] or [
        (d.source, d.source_format, d.translator)
    ]


def _metadata(cfg: RunConfig, base_hub: str | None, sources: list, langs: list[str], library: str) -> str:
    """The card's YAML header: Hub names only (a local base or data file is left out)."""
    from huggingface_hub import ModelCardData

    d, m, t = cfg.data, cfg.model, cfg.train
    data_hub = [h for h in (_hub_name(src) for src, _, _ in sources) if h]
    card_data = ModelCardData(
        base_model=base_hub or None,
        language=[d.source_lang, *langs],
        datasets=data_hub or None,
        library_name=library,
        license=t.hub_license or "other",
        pipeline_tag="text-generation",
        tags=["clo", "cross-lingual-optimization", "dpo"] + (["lora"] if m.lora is not None else []),
    )
    return card_data.to_yaml()


def _method_section(cfg: RunConfig, tgt: str, adapter: bool) -> list[str]:
    c, m = cfg.clo, cfg.model
    lam = {"sft": 1.0, "dpo": 0.0}.get(c.mode, c.lam)
    return [
        "",
        "## Method",
        "",
        f"Cross-Lingual Optimization ([Lee et al., ACL 2025]({PAPER_URL})): English instructions and their "
        f"{tgt} translations make cross-lingual preference pairs. The loss is λ · NLL of the "
        f"{tgt} response + (1 − λ) · a DPO-style preference term (temperature β) for answering in the "
        "prompt's language, against the frozen starting model as reference.",
        "",
        f"- mode `{c.mode}`: λ = {lam}, β = {c.beta}, reference-free = {c.reference_free}, NLL on sequences "
        f"{list(c.sft_sequences)}",
        f"- preference loss `{c.loss_type}`, label smoothing {c.label_smoothing}, length-normalized "
        f"{c.length_normalize}",
        "- trained: "
        + (
            f"LoRA r = {m.lora.r}, alpha = {m.lora.alpha} on {m.lora.target_patterns}"
            + (" (this adapter)" if adapter else " (merged into these weights)")
            if m.lora is not None
            else f"the parameters matching {list(m.trainable_patterns)}; the rest frozen"
        ),
    ]


def _data_section(cfg: RunConfig, sources: list, tgt: str, data_info: dict) -> list[str]:
    d = cfg.data
    lines = [
        "",
        "## Data",
        "",
        *[
            f"- source: `{_shown(src)}` ({fmt}), {d.source_lang} → {tgt}; translations: "
            + (f"machine-translated with `{_shown(d.translation_model)}`" if kind == "hf" else "given in the data")
            for src, fmt, kind in sources
        ],
    ]
    if data_info:
        lines.append(
            f"- pairs: {data_info.get('train_examples', '?')} for training, {data_info.get('eval_examples', '?')} "
            f"held out (each an English and a {tgt} prompt with both responses)"
        )
    lines.append(
        f"- sequences up to {d.max_length} tokens (prompt + response): a longer prompt dropped its example (prompts "
        "are never cut), a longer response was cut there"
    )
    return lines


def _training_section(cfg: RunConfig, summary: dict) -> list[str]:
    m, o = cfg.model, cfg.optim
    world = summary.get("world_size", "?")
    global_batch = summary.get("global_batch") or o.micro_batch_examples * o.gradient_accumulation_steps * (
        world if isinstance(world, int) else 1
    )
    return [
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| global batch | {global_batch} examples |",
        f"| learning rate | {o.lr} (AdamW, betas {list(o.betas)}, weight decay {o.weight_decay}) |",
        f"| schedule | {o.lr_scheduler_type}, {o.warmup_steps} warmup steps, warmup ratio {o.warmup_ratio}"
        + (f", floor lr × {o.min_lr_ratio}" if o.lr_scheduler_type == "cosine_with_min_lr" else "")
        + " |",
        f"| steps | {summary.get('steps', '?')} |",
        f"| seed | {o.seed} |",
        f"| precision | {m.dtype} |",
        f"| world size | {world} |",
    ]


def _license_and_citation(hub_license: str | None) -> list[str]:
    return [
        "",
        "## License",
        "",
        f"`{hub_license}`; the base model's own license terms apply as well."
        if hub_license
        else "Not stated by this run (train.hub_license): the base model's license applies.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
    ]


def write_model_card(
    directory: Path, cfg: RunConfig, summary: dict, evaluation_markdown: str | None = None, library="transformers"
) -> Path:
    path = Path(directory) / CARD_FILE
    path.write_text(model_card_text(cfg, summary, evaluation_markdown, library))
    return path


def add_evaluation_to_card(export_dir: Path, cfg: RunConfig, evaluation_markdown: str) -> None:
    """After the optional evaluation (which runs on the exported model), before any upload: the cards (the model's,
    and the adapter's beside it with LoRA) gain the before/after table."""
    export_dir = Path(export_dir)
    summary = json.loads((export_dir / SUMMARY_FILE).read_text())
    write_model_card(export_dir, cfg, summary, evaluation_markdown)
    adapter_dir = export_dir.with_name("hf_adapter")
    if cfg.model.lora is not None and (adapter_dir / CARD_FILE).is_file():
        write_model_card(adapter_dir, cfg, summary, evaluation_markdown, library="peft")
