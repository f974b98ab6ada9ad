"""The generic machinery behind the run config (clo_fast/config.py): YAML → typed dataclasses, `--set` overrides.

Nothing here knows the run's fields: `parse_dataclass` builds any dataclass from a mapping (unknown keys, wrong
types and non-finite numbers are errors naming the source and the dotted field), `load_dataclass` reads a YAML
file (a key given twice is an error) and applies `--set FIELD=VALUE` overrides, remembering which flag set which
field; `flatten_config` / `to_dict` turn a config into plain records (URL credentials redacted).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clo_fast.constants import MAX_CONFIG_STRING_CHARS


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names file and field."""


# ------------------------------------------------------------------------------- generic machinery
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _accepts_float(tp: Any) -> bool:
    return tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp))


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, list) and any(_non_finite(v) for v in value)


def _longest_string(value: Any) -> int:
    """The length of the longest string in a value (in lists and mappings too, keys included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return max((max(_longest_string(k), _longest_string(v)) for k, v in value.items()), default=0)
    if isinstance(value, list):
        return max((_longest_string(v) for v in value), default=0)
    return 0


def _optional_section(tp: Any) -> Any:
    """`Section | None` → Section (a non-null value of an optional section is parsed as the section)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    sections = [a for a in args if dataclasses.is_dataclass(a)]
    return sections[0] if len(sections) == 1 and type(None) in args else tp


def parse_dataclass(
    cls: type, raw: Any, where: str | Callable[[str], str], prefix: str = "", removed_keys: dict | None = None
):
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields.

    Unknown keys and wrong types raise ConfigError naming the source (`where`: a string, or a function of
    the dotted field name giving the file or the --set flag it came from) and the dotted field;
    `removed_keys` (dotted name → what replaced it) explains a key that existed once.
    """
    origin = where if callable(where) else (lambda _name: where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        name = prefix.rstrip(".") or "<top level>"
        raise ConfigError(f"{origin(name)}: {name}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(raw) - names):
        dotted = f"{prefix}{key}"
        why = (removed_keys or {}).get(dotted, f"unknown key (known: {', '.join(sorted(names))})")
        raise ConfigError(f"{origin(dotted)}: {dotted}: {why}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        tp = _optional_section(tp) if value is not None else tp
        if dataclasses.is_dataclass(tp):
            kwargs[name] = parse_dataclass(tp, value, origin, f"{prefix}{name}.", removed_keys)
            continue
        if isinstance(value, str) and _accepts_float(tp) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if not _type_ok(value, tp):
            raise ConfigError(f"{origin(prefix + name)}: {prefix}{name}: expected {tp}, got {value!r}")
        if _non_finite(value):
            raise ConfigError(f"{origin(prefix + name)}: {prefix}{name}: must be a finite number, got {value!r}")
        longest = _longest_string(value)
        if longest > MAX_CONFIG_STRING_CHARS:
            raise ConfigError(
                f"{origin(prefix + name)}: {prefix}{name}: a string of {longest:,} characters, over the limit of "
                f"{MAX_CONFIG_STRING_CHARS:,} (constants.MAX_CONFIG_STRING_CHARS; the config is copied into every "
                "record the run writes)"
            )
        kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


# ---------------------------------------------------------------------------- loading and overrides
def _unique_key_loader():
    """A yaml SafeLoader that refuses a key given twice in one mapping (`optim:` twice, or `lr:` twice in it):
    PyYAML's own keeps the last one without a word."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    break
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark
                    )
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def yaml_load(text: str):
    """yaml.safe_load, but a key repeated in one mapping is an error (yaml.YAMLError)."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)


def config_file(value: str) -> str:
    """argparse type of every command's --config: a YAML path, or the name of a shipped config (`demo`, `world`
    ...), which works from a wheel install too (clo_fast/configs/)."""
    import argparse

    from clo_fast.paths import configs_dir, shipped_config, shipped_config_names

    if Path(value).expanduser().exists():
        return value
    shipped = shipped_config(value)
    if shipped:
        return shipped
    if not Path(value).suffix and "/" not in value:  # a name, not a path: say which names exist
        names = ", ".join(shipped_config_names()) or f"none found in {configs_dir()}"
        raise argparse.ArgumentTypeError(
            f"{value}: no such file, and no shipped config by that name (shipped: {names})"
        )
    return value  # a missing path: load_config says "config file not found", naming it


def add_override_argument(parser) -> None:
    """The `--set FIELD=VALUE` option, the same for every command line (train, data, evaluate)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. --set optim.max_steps=10 (value parsed as YAML; repeatable); "
        "--optim.max_steps=10 and --optim.max_steps 10 (sweep tools' spelling) are the same",
    )


class SweepFlag(str):
    """A `FIELD=VALUE` override that was spelled `--FIELD=VALUE` (or `--FIELD VALUE`) on the command line: the
    same override as `--set FIELD=VALUE`, with the user's own spelling kept for error messages."""

    flag: str


def parse_args_with_overrides(parser, sections: set[str], argv=None):
    """`parser.parse_args`, plus the spelling sweep tools use (`wandb agent` passes `--clo.beta=0.2`):
    `--section.field=VALUE` and `--section.field VALUE`, where `section` is one of `sections`, are appended to
    `args.set` as if given as `--set section.field=VALUE` (the same parsing and checks). Any other unknown
    argument is refused as argparse refuses it."""
    args, rest = parser.parse_known_args(argv)
    unknown, i = [], 0
    while i < len(rest):
        token = rest[i]
        name, eq, value = token[2:].partition("=")
        if not (token.startswith("--") and name.split(".", 1)[0] in sections and "." in name):
            unknown.append(token)
            i += 1
            continue
        if not eq:  # --section.field VALUE: the next argument is the value (it may be negative: -1)
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                parser.error(f"{token}: expected a value (--{name}=VALUE or --{name} VALUE)")
            value, token = rest[i + 1], f"{token} {rest[i + 1]}"
            i += 1
        item = SweepFlag(f"{name}={value}")
        item.flag = token
        args.set.append(item)
        i += 1
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def parse_overrides(items: list[str] | dict | None) -> dict[str, tuple[Any, str]]:
    """`["clo.beta=0.2"]` → {"clo.beta": (0.2, "--set clo.beta=0.2")}; a dict {"clo.beta": 0.2} is accepted
    as well (API callers). The second element names the source in error messages. A field given twice with two
    values through a sweep flag and another flag (`--clo.beta=0.2 --set clo.beta=0.3`, whose order is lost) is
    refused, naming both: no flag silently loses. Between two --set flags the last wins, as documented."""
    import yaml

    if isinstance(items, dict):
        return {k: (v, f"override {k}={v!r}") for k, v in items.items()}
    out = {}
    for item in items or []:
        flag = getattr(item, "flag", f"--set {item}")
        if len(flag) > 120:  # named in messages: a huge value is not printed back whole
            flag = f"{flag[:80]}… ({len(flag):,} characters)"
        if "=" not in item:
            raise ConfigError(f"{flag}: expected FIELD=VALUE")
        key, value = (part.strip() for part in item.split("=", 1))
        if not key:
            raise ConfigError(f"{flag}: expected FIELD=VALUE")
        try:
            parsed = yaml_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{flag}: the value is not valid YAML: {e}") from None
        sweep = isinstance(item, SweepFlag)
        if key in out and out[key][0] != parsed and (sweep or out[key][2]):
            # sweep flags are gathered after argparse's --set list, so their order against --set is lost
            raise ConfigError(
                f"{flag}: {key} is also set by {out[key][1]} to another value; give each field once (the sweep "
                "spelling and --set cannot both set it)"
            )
        out[key] = (parsed, flag, sweep or (key in out and out[key][2]))  # --set after --set: the last wins
    return {k: (v, f) for k, (v, f, _) in out.items()}


def load_dataclass(
    cls: type, path: str | Path | None, overrides: list[str] | dict | None = None, removed_keys: dict | None = None
):
    """Read a YAML file (defaults when `path` is None), apply --set overrides and parse it as dataclass `cls`.

    Returns (the dataclass, origin): origin(dotted field) names the file, or the --set flag when the field was
    overridden, for the caller's validation errors."""
    import yaml

    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    parsed = parse_overrides(overrides)
    for dotted, (value, flag) in parsed.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if child is None:  # `optim:` left empty in the file
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{flag}: {p} is not a section")
            node = child
        if value is None and _is_required_section(cls, dotted):
            raise ConfigError(
                f"{flag}: {dotted} is a section; null would reset all of it to the defaults. Set its fields "
                f"(--set {dotted}.FIELD=VALUE), or give a mapping to change several ({dotted}={{field: value}})"
            )
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            value = _merged(node[leaf], value)  # a mapping changes the fields it names; the others stay
        node[leaf] = value

    def origin(name: str) -> str:
        # the flag that set this field, or one that set a section around it (--set 'model.lora={r: 0}'),
        # or one that set something inside it (--set optim.lr.x=1)
        parts = name.split(".")
        flags = (parsed.get(".".join(parts[:i]), (None, None))[1] for i in range(len(parts), 0, -1))
        flag = next((f for f in flags if f), None)
        nested = [f for k, (_, f) in parsed.items() if k.startswith(name + ".")]
        return flag or (nested[0] if nested else source)

    return parse_dataclass(cls, raw, origin, removed_keys=removed_keys), origin


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _is_required_section(cls: Any, dotted: str) -> bool:
    """True when `dotted` names a section (dataclass) field of `cls` that cannot be null (optim, train, ...;
    model.lora can: null turns LoRA off)."""
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if name not in hints:
            return False
        cls = hints[name]
    return dataclasses.is_dataclass(cls)


_URL_SECRETS = (
    (re.compile(r"^(https?://)[^/\s@]+@"), r"\1<redacted>@"),  # user:password@
    (re.compile(r"\?.*$"), "?<redacted>"),  # query string (?api-key=...)
)


def flatten_config(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-4}} → {"optim.lr": 1e-4}: nested config data keyed by dotted field names (for
    comparing a resumed run's config with the checkpoint's, and for loggers' flat parameter lists)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg) -> dict:
    """The config as plain data for the records a run writes (config.yaml, checkpoints, the export summary):
    credentials and query strings of URL values are redacted, so an API key put in a URL is never stored."""

    def scrub(v):
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items()}
        if isinstance(v, str) and re.match(r"https?://", v):
            for pattern, replacement in _URL_SECRETS:
                v = pattern.sub(replacement, v)
        return v

    return scrub(dataclasses.asdict(cfg))


# ------------------------------------------------------------------------------- the fields' own docs
# ------------------------------------------------------------------------------- field declarations
def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple | None = None,
    bounds: str | None = None,
    factory: Callable[[], Any] | None = None,
):
    """A config field declared once, as TRL declares its fields: the default, the help, the allowed values
    (`choices`, a tuple from clo_fast/constants.py or a table; a list field: each entry) and the numeric range
    (`bounds`: "(0, 10]", "[0, 2**32)", ">= 1", "> 0"). `check_declared`, `--help` and docs/CONFIG.md read it."""
    metadata: dict[str, Any] = {"help": " ".join(help.split())}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if bounds is not None:
        metadata["bounds"] = bounds
        metadata["bounds_test"] = _bounds_test(bounds)  # parsed once: a malformed range fails at import
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")
_RAY = re.compile(r"^(>=|>)\s*(\S+)$")


def _bound_number(text: str) -> float:
    if "**" in text:  # 2**32, as a seed's range reads
        base, exp = text.split("**")
        return float(int(base) ** int(exp))
    return float(text)


def _bounds_test(bounds: str) -> Callable[[float], bool]:
    """The predicate a bounds string states."""
    m = _INTERVAL.match(bounds)
    if m:
        lo, hi = _bound_number(m.group(2)), _bound_number(m.group(3))
        lo_ok = (lambda v: v > lo) if m.group(1) == "(" else (lambda v: v >= lo)
        hi_ok = (lambda v: v < hi) if m.group(4) == ")" else (lambda v: v <= hi)
        return lambda v: lo_ok(v) and hi_ok(v)
    m = _RAY.match(bounds)
    if not m:
        raise ValueError(f"bounds {bounds!r}: write (lo, hi], [lo, hi), >= lo or > lo")
    lo = _bound_number(m.group(2))
    return (lambda v: v >= lo) if m.group(1) == ">=" else (lambda v: v > lo)


def check_declared(obj: Any, prefix: str, origin: Callable[[str], str]) -> None:
    """Every field of dataclass instance `obj` (sections included) against its declared choices and bounds;
    a null is left to the type check (`parse_dataclass`). Raises ConfigError naming the source and the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name, value, meta = prefix + f.name, getattr(obj, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            check_declared(value, name + ".", origin)
            continue
        if value is None:
            continue
        or_null = " or null" if type(None) in typing.get_args(hints[f.name]) else ""
        for item in value if isinstance(value, list) else [value]:
            choices = meta.get("choices")
            if choices is not None and item not in choices:
                allowed = "|".join(str(c) for c in choices)
                raise ConfigError(f"{origin(name)}: {name}: must be {allowed}{or_null}, got {item!r}")
            bounds = meta.get("bounds")
            if bounds is not None and not meta["bounds_test"](item):
                spec = f"in {bounds}" if bounds[0] in "[(" else bounds
                raise ConfigError(f"{origin(name)}: {name}: must be {spec}{or_null}, got {item!r}")


def field_docs(cls: type, prefix: str = "") -> list[dict]:
    """Every field of dataclass `cls` (recursing into sections) as declared: {"name" (dotted), "type", "default",
    "help", "allowed"}, read from each field's `setting` declaration (a section without one: its class's
    docstring), so `--help`, docs/CONFIG.md and the checks read one place."""
    import inspect

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = _optional_section(hints[f.name])
        help_text = f.metadata.get("help", "")
        if not help_text and dataclasses.is_dataclass(tp):
            help_text = " ".join((inspect.getdoc(tp) or "").split())
        if dataclasses.is_dataclass(tp):
            out.append({"name": prefix + f.name, "type": "section", "default": None, "help": help_text, "allowed": ""})
            out += field_docs(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        allowed = " | ".join(str(c) for c in f.metadata.get("choices", ())) or f.metadata.get("bounds", "")
        name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        out.append({"name": prefix + f.name, "type": name, "default": default, "help": help_text, "allowed": allowed})
    return out


def fields_epilog(cls: type, sections: set[str]) -> str:
    """The config fields a command reads (`sections`), one line each, for its --help."""
    rows = [d for d in field_docs(cls) if d["name"].split(".")[0] in sections and d["type"] != "section"]
    width = max(len(d["name"]) for d in rows)
    lines = [
        f"  {d['name']:<{width}}  {yaml_value(d['default'])}" + (f"  ({d['allowed']})" if d["allowed"] else "")
        for d in rows
    ]
    return "config fields (--set FIELD=VALUE; each described in docs/CONFIG.md):\n" + "\n".join(lines)


def yaml_value(value: Any) -> str:
    """A default as one YAML flow line."""
    import json

    import yaml

    if isinstance(value, str) and "\n" in value:  # a JSON string is YAML, and stays on one line
        return json.dumps(value, ensure_ascii=False)
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
    return text.removesuffix("...").strip()
