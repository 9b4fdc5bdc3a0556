"""The package's import structure (DESIGN.md): front ends -> export -> training cores and runtime ->
the file format. Nothing imports upward and no two parts import each other, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import sparselite

PACKAGE = Path(sparselite.__file__).parent
# Lower levels may not import higher ones.
LEVEL = {
    "errors": 0, "tflite": 0, "quiet": 0, "progress": 0, "compat": 0, "interrupts": 0, "module_copy": 0,
    "hook_ids": 0, "stopping": 0, "deploy_form": 0,
    "checkpoints": 1,
    "runtime": 1, "pruning": 1, "quantization": 1, "distillation": 1, "models": 1, "data": 1, "evaluation": 1,
    "export": 2,
    "inspect": 3, "lightning_cli": 3, "demo": 3, "cli": 3,
    "__init__": 4,
}
# The training side knows nothing about TFLite files or runtimes.
TRAINING = {"pruning", "quantization", "distillation", "models", "data"}
FILE_SIDE = {"tflite", "runtime", "export"}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_edges() -> set[tuple[str, str]]:
    """(importing unit, imported unit) for every ``sparselite`` import anywhere in a module's code."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        me = _unit(".".join(("sparselite", *path.relative_to(PACKAGE).with_suffix("").parts)))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                assert not isinstance(node, ast.ImportFrom), f"{path}: use absolute imports"
                continue
            edges |= {(me, _unit(t)) for t in targets if t.split(".")[0] == "sparselite" and _unit(t) != me}
    return edges


def test_every_unit_has_a_level():
    units = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.glob("*")
             if path.suffix == ".py" or (path / "__init__.py").is_file()}
    assert units <= set(LEVEL), units - set(LEVEL)


def test_nothing_imports_upward():
    upward = sorted((a, b) for a, b in import_edges() if a != "__init__" and LEVEL[a] < LEVEL[b])
    assert upward == []


def test_training_side_does_not_import_the_file_side():
    assert sorted((a, b) for a, b in import_edges() if a in TRAINING and b in FILE_SIDE) == []


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    for a, b in import_edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph.get(start, ()))

    assert sorted(a for a in graph if reaches(a, a, {a})) == []
