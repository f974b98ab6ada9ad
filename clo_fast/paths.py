"""Path rules shared by every command: is a name a local path or a Hugging Face Hub name (one rule for datasets
and models); do output locations collide or nest; where the shipped run configs are."""

from __future__ import annotations

import os

LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def configs_dir() -> str:
    """The shipped run configs (demo.yaml, ds_zero3.json ...): package data in an installed wheel
    (clo_fast/configs/), the repository's configs/ in a source checkout or an editable install."""
    installed = os.path.join(_PACKAGE_DIR, "configs")
    checkout = os.path.join(os.path.dirname(_PACKAGE_DIR), "configs")
    return installed if os.path.isfile(os.path.join(installed, "demo.yaml")) else checkout


def shipped_config(name: str) -> str | None:
    """The path of the shipped config called `name` (`demo` → .../configs/demo.yaml), None when there is none.
    Only a bare name qualifies: anything with a folder or a suffix is a path."""
    if os.sep in name or "/" in name or os.path.splitext(name)[1]:
        return None
    path = os.path.join(configs_dir(), f"{name}.yaml")
    return os.path.normpath(path) if os.path.isfile(path) else None


def shipped_config_names() -> list[str]:
    d = configs_dir()
    return sorted(f[: -len(".yaml")] for f in os.listdir(d) if f.endswith(".yaml")) if os.path.isdir(d) else []


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


def overlapping_outputs(locations: dict[str, str | os.PathLike]) -> str | None:
    """None when no two output locations are the same folder or one lies inside another, else a sentence
    naming both (labels are the config fields or flags). Paths are compared resolved (symlinks followed,
    relative to the working directory), so two spellings of one folder collide."""
    from pathlib import Path

    resolved = {label: Path(p).expanduser().resolve() for label, p in locations.items() if p is not None}
    labels = list(resolved)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            pa, pb = resolved[a], resolved[b]
            if pa == pb:
                return f"{a} and {b} are the same folder ({pa})"
            for outer, inner in ((a, b), (b, a)):
                if resolved[outer] in resolved[inner].parents:
                    return f"{inner} ({resolved[inner]}) lies inside {outer} ({resolved[outer]})"
    return None
