"""Is a name a local path or a Hugging Face Hub name? One rule for datasets and models."""

from __future__ import annotations

import os

LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def looks_local(name: str) -> bool:
    """True for anything that exists, looks like a path (./x, ../x, /x, ~/x, x/, a/b/c) or names a data file;
    hub names are `name` or `owner/name`. A missing path then fails as "not found", not as a hub lookup."""
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith((".", "/", "~"))
        or name.endswith(("/", os.sep))
        or name.count("/") >= 2
        or (os.sep != "/" and os.sep in name)
        or name.lower().endswith(LOCAL_DATA_SUFFIXES)
    )
