"""The demo multiple-choice task's documents: demo_mc.jsonl beside this file, one language at a time.

lm-evaluation-harness calls `demo_mc(lang=...)` through the YAML's `custom_dataset: !function load.demo_mc`
(with the YAML's dataset_kwargs), so the task reads the file next to it wherever the package is installed.
"""

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parent / "demo_mc.jsonl"


def demo_mc(lang: str, **_metadata):
    import datasets

    rows = [json.loads(line) for line in DOCS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([r for r in rows if r["lang"] == lang])})
