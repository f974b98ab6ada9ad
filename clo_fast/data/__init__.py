"""Cross-lingual dataset builder: English SFT data → translation → paired CLO examples.

    sources    read the source (bundled demo, HF dataset, local json/jsonl/parquet/csv, oasst1 trees) into Pairs
    translate  the translators (columns already in the data | a HF seq2seq model, cached)
    split      the train/eval split
    build      select, translate, pair, split: the model-independent text dataset (saved, reused by config key)
    tokenize   the four sequences per example, labels on response tokens, cached on disk
    collate    padded batches with shifted labels
    cli        `python -m clo_fast.data --config configs/<run>.yaml` (console script `clo-fast-data`)

The contracts between these steps and their users are in docs/INTERFACES.md. This package never imports
the model or training code.
"""

from clo_fast.constants import SEQUENCE_KINDS
from clo_fast.data.build import TEXT_COLUMNS, build_text_dataset, load_or_build_text_dataset, save_text_dataset
from clo_fast.data.collate import collate_clo
from clo_fast.data.sources import DataError, Pair, demo_data_path, read_pairs
from clo_fast.data.tokenize import format_prompt, special_prefix, tokenize_dataset

__all__ = [
    "SEQUENCE_KINDS",
    "TEXT_COLUMNS",
    "DataError",
    "Pair",
    "build_text_dataset",
    "collate_clo",
    "demo_data_path",
    "format_prompt",
    "load_or_build_text_dataset",
    "read_pairs",
    "save_text_dataset",
    "special_prefix",
    "tokenize_dataset",
]
