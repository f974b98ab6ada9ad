"""The layering of docs/DESIGN.md §2: a module imports only from its own layer or lower ones."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "clo_fast"

# lowest first; a module is in the first layer whose prefix matches its dotted name
LAYERS = [
    (
        "facts",
        [
            "clo_fast.constants",
            "clo_fast.atomic",
            "clo_fast.paths",
            "clo_fast.language_id",
            "clo_fast.numerics",
            "clo_fast.logs",
        ],
    ),
    ("attention", ["clo_fast.attention"]),
    ("config", ["clo_fast.config_loading", "clo_fast.config"]),
    ("maths", ["clo_fast.ops", "clo_fast.loss"]),
    ("data", ["clo_fast.data", "clo_fast.packing"]),
    (
        "model",
        ["clo_fast.demo_model", "clo_fast.world", "clo_fast.gguf_model", "clo_fast.pretrained", "clo_fast.model"],
    ),
    ("training", ["clo_fast.training"]),
    ("evaluation", ["clo_fast.evaluate"]),
    (
        "entry points",
        [
            "clo_fast.cli",
            "clo_fast.train",
            "clo_fast.compare",
            "clo_fast.merge_adapter",
            "clo_fast.data.cli",
            "clo_fast.data.__main__",
            "clo_fast.evaluate.cli",
            "clo_fast.evaluate.__main__",
            "clo_fast.__init__",
        ],
    ),
]


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            matches = module == p or module.startswith(p + ".")
            if matches and (best is None or len(p) > best[1]):  # the longest matching prefix decides
                best = (rank, len(p))
    assert best is not None, f"{module} is in no layer: add it to docs/DESIGN.md §2 and LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "clo_fast":  # `from clo_fast import numerics`
            found.update(f"clo_fast.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clo_fast"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clo_fast"))
    return found


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        for dep in imports(path):
            if layer_of(dep) > layer_of(mod):
                wrong.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not wrong, "\n".join(wrong)


def _string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and n.value}


def test_one_table_of_attention_backends_read_by_config_and_model():
    """clo_fast/attention.py's ATTENTION_BACKENDS is the one list of attention backends: the config validates
    model.attn_implementation against it, the model builds a packed batch's attention inputs and checks a
    backend's package from it, and no other module names a backend (sdpa, the default, aside)."""
    from clo_fast import attention, config, model

    readers = [m for m in (config, model) if m.ATTENTION_BACKENDS is attention.ATTENTION_BACKENDS]
    assert readers == [config, model]
    assert "ATTENTION_BACKENDS" in (PKG / "attention.py").read_text().split("def attention_inputs", 1)[1]
    others = set(attention.ATTENTION_BACKENDS) - {"sdpa"}
    named = {
        f"{path.relative_to(PKG.parent)} names {name!r}"
        for path in sorted(PKG.rglob("*.py"))
        if path.name != "attention.py"
        for name in others & _string_constants(path)
    }
    assert not named, "\n".join(sorted(named))
    # the packing modes: stated once (constants.PACKING_MODES), read by the config, the layouts and the table
    from clo_fast import constants, packing

    assert config.PACKING_MODES is packing.PACKING_MODES is attention.PACKING_MODES is constants.PACKING_MODES
    for name, backend in attention.ATTENTION_BACKENDS.items():
        assert set(backend.packing) <= set(constants.PACKING_MODES), name
        assert backend.cpu_packing is None or set(backend.cpu_packing) <= set(constants.PACKING_MODES), name


def test_each_set_of_choices_is_stated_once():
    """The allowed values of a field that several modules read live in constants; the validator and the
    implementation read that same object."""
    from clo_fast import config, constants, loss, ops
    from clo_fast.training import metrics

    assert config.CLO_MODES is constants.CLO_MODES
    assert config.LOSS_TYPES is loss.LOSS_TYPES is constants.LOSS_TYPES
    assert config.SOURCE_FORMATS is constants.SOURCE_FORMATS
    assert config.REPORTERS is constants.REPORTERS and set(metrics.LOGGERS) == set(constants.REPORTERS)
    assert config.HEAD_IMPLS is constants.HEAD_IMPLS and tuple(ops.HEAD_IMPLS) == constants.HEAD_IMPLS


def test_every_config_field_takes_its_allowed_values_from_one_place():
    """A field's allowed values are declared beside it (`setting(choices=...)`), as a name (constants, a table) or
    built from one, never a literal list of strings; and no validator tests a value against a literal set."""
    tree = ast.parse((PKG / "config.py").read_text())
    literal = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setting":
            for kw in node.keywords:
                elts = getattr(kw.value, "elts", None)
                if kw.arg == "choices" and elts is not None and all(isinstance(e, ast.Constant) for e in elts):
                    literal.append(f"line {node.lineno}: choices={ast.unparse(kw.value)}")
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            for side in node.comparators:
                elts = getattr(side, "elts", None)
                if elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
                    literal.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not literal, "\n".join(literal)
    from clo_fast import config, constants
    from clo_fast.config_loading import field_docs

    allowed = {d["name"]: d["allowed"] for d in field_docs(config.RunConfig)}
    assert allowed["clo.mode"] == " | ".join(constants.CLO_MODES)
    assert allowed["data.template"] == " | ".join(constants.TEMPLATES)
    assert allowed["train.head_impl"] == " | ".join(("auto", *constants.HEAD_IMPLS))
    assert allowed["optim.lr_scheduler_type"] == " | ".join(constants.LR_SCHEDULER_TYPES)


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers.py (and fixtures in tests/conftest.py), never in a test file."""
    tests = Path(__file__).resolve().parent
    wrong = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            wrong += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith(("test_", "conftest"))]
    assert not wrong, "\n".join(wrong)


def test_every_cited_file_exists():
    """Code and docs cite files by path (e.g. docs/DESIGN.md §3): each must be in the repository."""
    import re

    root = PKG.parent
    cited = re.compile(r"\b((?:docs|clo_fast|kernels|benchmarks|configs|tests)/[\w./-]+\.(?:md|py|yaml|json))")
    bare = re.compile(r"(?<![/\w])(DESIGN|INTERFACES)\.md")  # a doc cited without its folder
    missing = []
    for path in [*root.glob("*.md"), *root.glob("docs/*.md"), *PKG.rglob("*.py"), *root.glob("tests/*.py")]:
        text = path.read_text()
        missing += [f"{path.relative_to(root)} cites {ref}" for ref in cited.findall(text) if not (root / ref).exists()]
        missing += [f"{path.relative_to(root)} cites {m.group(0)} without docs/" for m in bare.finditer(text)]
    assert not missing, "\n".join(missing)


def test_no_import_cycle_between_modules():
    """No module imports one that imports it back, function-level imports included (a cycle hides a layer
    boundary: comparison and comparison_extra had one)."""
    modules = {module_name(p).removesuffix(".__init__"): p for p in PKG.rglob("*.py")}
    graph = {m: {d for d in imports(p) if d in modules and d != m} for m, p in modules.items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    # a package's __init__ re-exporting its modules, which import `from clo_fast.<pkg> import x`, is not a cycle
    cycles = [c for c in cycles if not (set(c.split(" -> ")) & packages)]
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_no_function_is_over_90_lines_and_the_recipes_stay_short():
    """A function a reader takes in at once (issue #32): none over 90 lines in the library, the kernels, the
    benchmarks or the scripts; the training recipe within 350 lines, the step benchmark within 450."""
    root = PKG.parent
    long = []
    for folder in ("clo_fast", "kernels", "benchmarks", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and size > 90:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({size} lines)")
    assert not long, "\n".join(long)
    assert len((PKG / "train.py").read_text().splitlines()) <= 350
    assert len((root / "benchmarks" / "bench_step.py").read_text().splitlines()) <= 450
