"""The reference model's log-probs: one no-grad pass with the starting weights, stored with the data.

The engine holds the starting weights before the first update, so it *is* the reference model then; the
result is saved as a `ref_logps` column under <train.reference_dir or output_dir/ref_data>/<split> and reused by
every resume (and by every run pointed at the same folder: the cache is keyed by what the values depend on).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from clo_fast.atomic import atomic_directory, claim_output_dir
from clo_fast.config import RunConfig
from clo_fast.training.distributed import barrier, computed_on_rank0, log0, rank
from clo_fast.training.scoring import score_dataset

META_FILE = "clo_ref_meta.json"


def reference_root(cfg: RunConfig) -> Path:
    """The folder holding the cached reference log-probs, one subfolder per split."""
    t = cfg.train
    return Path(t.reference_dir).expanduser() if t.reference_dir else Path(t.output_dir) / "ref_data"


def reference_key(ds, cfg: RunConfig, model_path: str) -> dict:
    """What the reference log-probs depend on: the model's content (config and weight files, or the hub
    snapshot's revision; not its path), the data, the precision and the head implementation."""
    from clo_fast.pretrained import model_fingerprint

    return {
        "model": model_path,
        "model_content": model_fingerprint(model_path, memo_dir=cfg.data.cache_dir),
        "data": getattr(ds, "_fingerprint", None),
        "rows": len(ds),
        "precision": cfg.model.dtype,
        "head_impl": cfg.train.head_impl,
    }


def with_reference_logps(ds, split: str, engine, collate, cfg: RunConfig, model_path: str, device):
    """The dataset with a `ref_logps` column: loaded when it was computed for the same model, data and
    precision, else computed (every rank) and saved (rank 0)."""
    import datasets

    key = computed_on_rank0(lambda: reference_key(ds, cfg, model_path))  # the weights are hashed once, not per rank
    where = reference_root(cfg) / split
    meta = where / META_FILE
    if meta.is_file() and json.loads(meta.read_text()) == key:
        log0(f"reference log-probs ({split}): reusing {where}")
        return datasets.load_from_disk(str(where))
    t0 = time.time()
    ref, _ = score_dataset(engine, ds, collate, cfg.optim.micro_batch_examples, device, desc=f"reference ({split})")
    ds = ds.add_column("ref_logps", ref.cpu().tolist())
    if rank() == 0:
        claim_output_dir(where.parent, "train.reference_dir", "reference_cache")
        with atomic_directory(where, "reference_cache") as tmp:
            ds.save_to_disk(str(tmp))
            (tmp / META_FILE).write_text(json.dumps(key))
    barrier()
    log0(f"reference log-probs ({split}): {len(ds)} examples in {time.time() - t0:.1f}s → {where}")
    return ds
