"""A LoRA adapter merged into its base model, as a plain HF model folder that training can start from:

    python -m clo_fast.merge_adapter path/to/adapter path/to/merged [--base BASE] [--dtype bfloat16]

then `model.name_or_path: path/to/merged` (and `model.lora` again to train a new adapter on top). The base model
is the adapter's own (adapter_config.json: base_model_name_or_path) unless --base names it; the tokenizer is the
adapter folder's when it has one, else the base model's. The output is published atomically as an export folder:
a folder the user made, or another kind of output, is refused, never overwritten."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clo_fast.constants import PRECISION_DTYPE_NAMES, TOKENIZER_FILES


def merge_adapter(adapter: str, out: str, base: str | None = None, dtype: str = "float32") -> Path:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from clo_fast.atomic import check_publishable, publish, staging_path
    from clo_fast.pretrained import load_tokenizer

    target = Path(out).expanduser()
    check_publishable(target, "merged model folder", kind="export")  # before the (long) merge
    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter}: adapter_config.json names no base_model_name_or_path; pass --base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_tokenizer = any((Path(adapter) / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(adapter if has_tokenizer else base)
    tmp = staging_path(target)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    return publish(tmp, target, "export")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clo_fast.merge_adapter", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="a PEFT LoRA adapter folder (adapter_config.json + adapter weights)")
    p.add_argument("out", help="the merged model folder to write (must not be a folder clo_fast did not make)")
    p.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default="float32", choices=sorted(PRECISION_DTYPE_NAMES.values()))
    a = p.parse_args(argv)
    from clo_fast.atomic import OutputDirError

    try:
        out = merge_adapter(a.adapter, a.out, a.base, a.dtype)
    except (OutputDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}; train from it with --set model.name_or_path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
