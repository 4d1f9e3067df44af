"""The package's layering and import claims (docs/architecture.md): no module imports from a layer above
its own, the imports between the package's modules have no cycles, every module has a layer of its
own, and what importing the command layer, the translator and the pruning callback loads.

Imports are followed as Python runs them: importing ``seq2seq.data.collate`` also runs
``seq2seq/__init__.py`` and ``seq2seq/data/__init__.py``, so a package's ``__init__`` counts as imported
by every module that imports anything inside it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seq2seq"

# Top (1) to bottom (6), as docs/architecture.md draws them. A name ending in ".*" is every module
# inside that package (its __init__ included); every other module is listed by its own name.
LAYERS = {
    "seq2seq.prepare": 1,
    "seq2seq.averaging": 1,
    "seq2seq.length_buckets": 1,
    "seq2seq.serve.*": 1,  # python -m seq2seq.serve: the HTTP server, its batcher, the page
    "seq2seq.training": 2,
    "seq2seq.evaluation": 3,
    "seq2seq.translator": 4,
    "seq2seq.module": 4,
    "seq2seq.callbacks": 4,
    "seq2seq.progress": 4,
    "seq2seq.checkpoints": 4,
    "seq2seq.run_dir": 4,
    "seq2seq.sweep": 4,
    "seq2seq.sweeper.*": 4,
    "seq2seq.pruning": 4,
    "seq2seq.slurm": 4,
    "seq2seq.search": 5,
    "seq2seq.shortlist": 5,  # lexical shortlists: built from the training data, read by search's callers
    "seq2seq.metrics": 5,
    "seq2seq.precision": 5,
    "seq2seq.flops": 5,
    "seq2seq.schedules": 5,
    "seq2seq.ema": 5,
    "seq2seq.cli": 5,
    "seq2seq.run_clock": 5,  # the run's clock (Lightning's Timer), read by callbacks, schedules, pruning
    "seq2seq.trial": 5,  # the trial protocol between the sweeper and a training run (no Optuna)
    "seq2seq.data.*": 6,
    "seq2seq.model.*": 6,
    "seq2seq.tokenization": 6,
    "seq2seq": 6,  # the package's __init__, which every import runs: registers the decoding config group
    "seq2seq.decoding": 6,  # a leaf: the decoding settings (plain Python), which the package registers
    "seq2seq.private_apis": 6,  # a leaf: imports none of the libraries whose private names it holds
    "seq2seq.files": 6,  # a leaf: files written whole (translations, checkpoints)
    "seq2seq.errors": 6,  # a leaf: UserError, raised by every layer
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(module: str) -> bool:
    return (PACKAGE.parent / Path(*module.split(".")) / "__init__.py").is_file()


def layer_entries(module: str) -> list[str]:
    """The LAYERS entries that name ``module``: its own, or its package's ``.*``."""
    entries = [module] if module in LAYERS else []
    package = module if is_package(module) else module.rpartition(".")[0]
    while package:
        if f"{package}.*" in LAYERS:
            entries.append(f"{package}.*")
        package = package.rpartition(".")[0]
    return entries


def layer(module: str) -> int:
    (entry,) = layer_entries(module)
    return LAYERS[entry]


def with_packages(module: str) -> set[str]:
    """``module`` and every package above it: what importing it runs."""
    parts = module.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts) + 1)}


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, module_level_only: bool) -> tuple[set[str], set[str]]:
    """(the seq2seq modules, the other top-level packages) that ``path`` imports: everywhere, or only
    where importing the module runs them (module level, outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes: list[ast.AST] = []
    if module_level_only:
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or is_type_checking(
                node
            ):
                continue
            nodes.append(node)
            todo.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    own, external = set(), set()
    this = module_name(path)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x
                base = this if path.name == "__init__.py" else this.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.split(".")[0] != "seq2seq":
                external.add(name.split(".")[0])
                continue
            for alias in node.names:  # `from seq2seq.data import collate` imports a module
                candidate = f"{name}.{alias.name}"
                exists = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file()
                own |= with_packages(candidate if exists or is_package(candidate) else name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "seq2seq":
                    own |= with_packages(alias.name)
                else:
                    external.add(alias.name.split(".")[0])
    return own - {this}, external


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = {name: imports_of(path, module_level_only=False)[0] for name, path in MODULES.items()}


@cache
def loaded_by_importing(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(the seq2seq modules, the other top-level packages) that ``import module`` loads, by the source:
    module-level imports followed through every module they load, packages' ``__init__`` included."""
    own, external, todo = set(), set(), sorted(with_packages(module))
    while todo:
        name = todo.pop()
        if name in own:
            continue
        own.add(name)
        imported, libraries = imports_of(MODULES[name], module_level_only=True)
        external |= libraries
        todo.extend(imported - own)
    return frozenset(own), frozenset(external)


def test_every_module_has_exactly_one_layer_entry_and_every_entry_a_module():
    unlisted = sorted(m for m in MODULES if not layer_entries(m))
    assert not unlisted, f"modules without a layer in LAYERS (and docs/architecture.md): {unlisted}"
    ambiguous = sorted(m for m in MODULES if len(layer_entries(m)) > 1)
    assert not ambiguous, f"modules with two LAYERS entries: {ambiguous}"
    stale = sorted(e for e in LAYERS if not any(e in layer_entries(m) for m in MODULES))
    assert not stale, f"LAYERS entries that name no module: {stale}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_its_own(module):
    upward = sorted(name for name in IMPORTS[module] if layer(name) < layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports {upward} from above"


def test_the_package_has_no_import_cycles():
    # A package's __init__ imported as the parent of a module is not an edge back into that package.
    graph = {
        module: {name for name in imports if not module.startswith(f"{name}.")}
        for module, imports in IMPORTS.items()
    }
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            if state.get(name) == "open":
                raise AssertionError(f"import cycle: {' -> '.join([*path, module, name])}")
            if name not in state:
                visit(name, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


TRAINING_DATA = ("seq2seq.data.datamodule", "seq2seq.data.sampler", "seq2seq.data.prepared",
                 "seq2seq.data.mixture", "seq2seq.data.sampling")  # fmt: skip
TRAINING = ("seq2seq.module", "seq2seq.callbacks", "seq2seq.training", "seq2seq.sweeper")

# What importing a module must not load (docs/architecture.md): the commands answer --help and a
# mistyped key without torch; the translator needs the model, the tokenizer and the search, not
# Lightning or the training data; a training run's pruning callback needs no Optuna.
MUST_NOT_LOAD = {
    "seq2seq.cli": ("torch", "lightning", "numpy", "sentencepiece", "seq2seq.model", "seq2seq.search"),
    "seq2seq.checkpoints": ("torch", "lightning"),  # translate.py checks its paths with it first
    # python -m seq2seq.serve checks its options and takes its port before loading torch and the web framework
    "seq2seq.serve.__main__": ("torch", "fastapi", "uvicorn", "starlette", "seq2seq.model", "seq2seq.search"),
    "seq2seq.translator": ("lightning", "pytorch_lightning", "torchmetrics", *TRAINING_DATA, *TRAINING),
    "seq2seq.pruning": ("optuna", "seq2seq.sweeper"),
}


def starts_with_any(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


@pytest.mark.parametrize("module", sorted(MUST_NOT_LOAD))
def test_what_importing_a_module_loads_by_its_source(module):
    own, external = loaded_by_importing(module)
    loaded = sorted(n for n in own | external if starts_with_any(n, MUST_NOT_LOAD[module]))
    assert not loaded, f"importing {module} loads {loaded}"


def test_what_importing_a_module_loads_in_a_fresh_interpreter():
    """The same claims, measured: the modules are imported one after the other in one new process, and
    after each, nothing loaded so far may be what it must not load (third-party packages that import
    torch would show here). The order puts each module after those whose claims are stricter."""
    order = [
        "seq2seq.cli",
        "seq2seq.checkpoints",
        "seq2seq.serve.__main__",
        "seq2seq.translator",
        "seq2seq.pruning",
    ]
    assert sorted(order) == sorted(MUST_NOT_LOAD)
    script = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "loaded = {}\n"
        f"for module in {order!r}:\n"
        "    __import__(module)\n"
        "    loaded[module] = sorted(set(sys.modules) - before)\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    for module in order:
        unwanted = [name for name in loaded[module] if starts_with_any(name, MUST_NOT_LOAD[module])]
        assert not unwanted, (
            f"importing {module} (after {order[: order.index(module)]}) loaded {unwanted[:10]}"
        )
