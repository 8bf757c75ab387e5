"""Dependencies point one way (DESIGN.md, docs/architecture.md): every first-party import in the tree
is read with `ast` and checked against the layer rules, so a new backward import fails here.

    clipray -> {pipeline, training, evaluation} -> {storage, ray_compat, training.model, the tokenizer}

- `storage` and `ray_compat` import no stage; `training.model` and the tokenizer import neither
  other training modules nor any stage.
- Of `training`, the pipeline and evaluation use only the model and the tokenizer.
- Training's validation (`training/validation.py`) may call evaluation's functions: the one edge from
  training to evaluation, and only inside functions (importing training never imports evaluation).
- No stage imports the front door, except the `__main__.py` aliases (`python -m pipeline` is
  `clipray pipeline`), which only call `clipray.cli`.
- Ray's private modules (`ray._private`, `..._internal...`) only in `ray_compat`.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clipray", "pipeline", "training", "evaluation", "storage", "ray_compat")
# Modules every stage may use (the bottom of the order).
SHARED = ("storage", "ray_compat", "training.model", "training.tokenizer", "training.text_clean")
STAGE_RULES = {
    "pipeline": ("pipeline", *SHARED),
    "evaluation": ("evaluation", *SHARED),
    "training": ("training", "storage", "ray_compat"),
    "storage": ("storage",),
    "ray_compat": ("ray_compat",),
    # The model's Hugging Face export writes the tokenizer's vocabulary beside the weights.
    "training.model": ("training.model", "storage", "training.tokenizer", "training.text_clean"),
    "training.tokenizer": ("training.tokenizer", "training.text_clean"),  # the tokenizer and its text cleaning
    "training.text_clean": ("training.text_clean",),
}
VALIDATION_MODULE = "training.validation"


class Import(NamedTuple):
    module: str  # importing module, dotted
    target: str  # imported module, dotted
    line: int
    top_level: bool  # at module level (runs on import), not inside a function


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, not in_function)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this package
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                yield Import(module, target, child.lineno, not in_function)
                for alias in child.names:  # `from training import model` imports training.model
                    yield Import(module, f"{target}.{alias.name}", child.lineno, not in_function)
            yield from visit(child, nested)

    yield from visit(tree, False)


def _first_party(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def _within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _rule_for(module: str) -> tuple[str, ...]:
    """The most specific rule that covers `module`."""
    best = max((key for key in STAGE_RULES if _within(module, (key,))), key=len, default=None)
    return STAGE_RULES[best] if best else ()


def _all_imports() -> list[Import]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found.extend(_imports(path))
    return found


def _known_module(target: str) -> bool:
    """`from training import model` also yields `training.model`; `from x import some_function`
    yields `x.some_function`, which is no module: only real modules and packages are checked."""
    path = ROOT / Path(*target.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_first_party_imports_follow_the_layers():
    bad = []
    for imp in _all_imports():
        if not _first_party(imp.target) or not _known_module(imp.target) or imp.module.startswith("clipray"):
            continue
        if imp.module.endswith("__main__") and imp.target in ("clipray", "clipray.cli"):
            continue  # `python -m <stage>` is the same command as `clipray <stage>`
        if _within(imp.module, (VALIDATION_MODULE,)) and _within(imp.target, ("evaluation",)):
            if imp.top_level:
                bad.append(f"{imp.module}:{imp.line} imports {imp.target} at module level (only inside functions)")
            continue
        if not _within(imp.target, _rule_for(imp.module)):
            bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
    assert bad == [], "imports against the dependency order:\n  " + "\n  ".join(bad)


def test_the_checker_sees_a_backward_import(tmp_path, monkeypatch):
    """The rules above fail on what they forbid (guards the guard)."""
    probe = ROOT / "storage" / "_probe_backward_import.py"
    probe.write_text("from training.loop import TrainLoop\n")
    try:
        imports = list(_imports(probe))
        assert any(i.target == "training.loop" for i in imports)
        assert not _within("training.loop", _rule_for("storage._probe_backward_import"))
    finally:
        probe.unlink()


def test_ray_private_apis_only_in_ray_compat():
    private = ("ray._private", "._internal")
    bad = []
    for folder in (*PACKAGES, "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parts[len(ROOT.parts)] == "ray_compat" or path == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if "ray" in code and any(p in code for p in private):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert bad == [], "Ray's private modules are reached only through ray_compat:\n  " + "\n  ".join(bad)
