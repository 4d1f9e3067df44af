"""The package's layering (docs/architecture.md): no module imports from a layer above its own, and the
imports between the package's modules have no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seq2seq"

# Top (1) to bottom (6), as docs/architecture.md draws them.
LAYERS = {
    "seq2seq.prepare": 1,
    "seq2seq.averaging": 1,
    "seq2seq.length_buckets": 1,
    "seq2seq.training": 2,
    "seq2seq.evaluation": 3,
    "seq2seq.translator": 4,
    "seq2seq.module": 4,
    "seq2seq.callbacks": 4,
    "seq2seq.checkpoints": 4,
    "seq2seq.run_dir": 4,
    "seq2seq.sweep": 4,
    "seq2seq.sweeper": 4,
    "seq2seq.pruning": 4,
    "seq2seq.slurm": 4,
    "seq2seq.search": 5,
    "seq2seq.metrics": 5,
    "seq2seq.precision": 5,
    "seq2seq.flops": 5,
    "seq2seq.schedules": 5,
    "seq2seq.ema": 5,
    "seq2seq.cli": 5,
    "seq2seq": 1,  # the package's __init__: registers the decoding config group for the commands
    "seq2seq.data": 6,
    "seq2seq.model": 6,
    "seq2seq.tokenization": 6,
    "seq2seq.private_apis": 6,  # a leaf: the data module reads the loop position through it
    "seq2seq.files": 6,  # a leaf: files written whole (translations, checkpoints)
    "seq2seq.errors": 6,  # a leaf: UserError, raised by every layer
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of ``module``: its own entry, else its package's (seq2seq.data.* are data's)."""
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def package_imports(path: Path) -> set[str]:
    """The seq2seq modules that ``path`` imports, at the top or inside functions (TYPE_CHECKING too)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seq2seq"):
            for alias in node.names:  # `from seq2seq.data import collate` imports a module
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file()
                imported.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.startswith("seq2seq")}
    return imported


MODULES = {module_name(path): package_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_its_own(module):
    upward = sorted(name for name in MODULES[module] if layer(name) < layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports {upward} from above"


def test_the_package_has_no_import_cycles():
    # Imports of a package's __init__ re-export its modules: follow the modules themselves.
    graph = {module: {name for name in imports if name != module} for module, imports in MODULES.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            if name in {"seq2seq", "seq2seq.data", "seq2seq.model"}:
                continue  # the package inits import down into their own modules only
            if state.get(name) == "open":
                raise AssertionError(f"import cycle: {' -> '.join([*path, module, name])}")
            if name not in state:
                visit(name, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_every_module_has_a_layer():
    assert all(layer(module) for module in MODULES)
