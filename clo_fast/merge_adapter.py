"""A LoRA adapter merged into its base model, as a plain HF model folder that training can start from:

    python -m clo_fast.merge_adapter path/to/adapter path/to/merged [--base BASE] [--dtype bfloat16]

then `model.name_or_path: path/to/merged` (and `model.lora` again to train a new adapter on top). The base model
is the adapter's own (adapter_config.json: base_model_name_or_path) unless --base names it; the tokenizer is the
adapter folder's when it has one, else the base model's. The output is published atomically as a merged-model
folder, and follows the ownership rule of every output (clo_fast/atomic.py): it must be absent, empty, or an earlier
merged model; never the adapter or the base model itself (nor a folder holding them or inside them), never inside
another clo_fast output (a run's folder, its hf_model / hf_adapter exports ...). Anything else is refused before
the merge starts, never overwritten."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clo_fast.constants import PRECISION_DTYPE_NAMES, TOKENIZER_FILES
from clo_fast.logs import add_log_level_argument, get_logger, setup_logging


def merge_adapter(adapter: str, out: str, base: str | None = None, dtype: str = "float32") -> Path:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from clo_fast.atomic import publish, staging_path
    from clo_fast.paths import looks_local
    from clo_fast.pretrained import load_tokenizer

    target = Path(out).expanduser()
    if not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        raise ValueError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    named_base = base
    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter}: adapter_config.json names no base_model_name_or_path; pass --base")
    check_merge_target(target, adapter, base)  # before the (long) merge
    if looks_local(base) and not Path(base).expanduser().is_dir():
        where = "--base" if named_base else f"{Path(adapter) / 'adapter_config.json'}: base_model_name_or_path"
        raise ValueError(f"{where}: the base model folder {base} does not exist; pass --base with its current path")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_tokenizer = any((Path(adapter) / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(adapter if has_tokenizer else base)
    tmp = staging_path(target)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    return publish(tmp, target, "merged_model")


def check_merge_target(target: Path, adapter: str, base: str) -> None:
    """The ownership rule for the merged folder (OutputDirError naming it): not the input, not nested in or
    holding the input, not inside another clo_fast output, and absent, empty or an earlier merged model."""
    from clo_fast.atomic import OUTPUT_KINDS, OutputDirError, check_publishable, enclosing_output

    what = "merged model folder"
    resolved = target.resolve()
    for role, src in (("adapter", adapter), ("base model", base)):
        src_path = Path(src).expanduser()
        if not src_path.exists():
            continue
        src_path = src_path.resolve()
        if resolved == src_path or src_path in resolved.parents or resolved in src_path.parents:
            relation = "is" if resolved == src_path else "overlaps"
            raise OutputDirError(
                f"{target}: the {what} {relation} the {role} folder {src}, which the merge reads; write the merged "
                "model to a new folder"
            )
    outer = enclosing_output(target)
    if outer is not None:
        folder, kind = outer
        holds = OUTPUT_KINDS.get(kind, "clo_fast output")
        raise OutputDirError(
            f"{target}: the {what} would be inside {folder}, a {holds}; an output never nests in another: write "
            f"it beside that folder (e.g. {folder.parent / (folder.name + '-' + target.name)})"
        )
    check_publishable(target, what, kind="merged_model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clo_fast.merge_adapter", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="a PEFT LoRA adapter folder (adapter_config.json + adapter weights)")
    p.add_argument(
        "out",
        help="the merged model folder to write: new, empty, or an earlier merged model (never the adapter, the "
        "base, or a folder inside a run or another output)",
    )
    p.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="float32", choices=sorted(PRECISION_DTYPE_NAMES.values()))
    add_log_level_argument(p)
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    from clo_fast.atomic import OutputDirError

    try:
        out = merge_adapter(a.adapter, a.out, a.base, a.dtype)
    except (OutputDirError, ValueError) as e:
        get_logger().error(f"error: {e}")
        return 2
    print(f"merged model written to {out}; train from it with --set model.name_or_path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
