"""Shared fixtures: composed Hydra configs pointed at tmp_path, and tiny models."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

# One thread per test process and per process a test starts (they inherit it): pytest-xdist runs a test
# process per core, and several torch thread pools on the same cores wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # after the thread count is set
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from seq2seq.model import Seq2Seq

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# Tests train and decode in fp32 whatever trainer.precision=auto would pick on the host (bf16 where the
# CPU has it), so that their figures are the same on every host; the tests about bf16 override these.
FP32 = ["trainer.precision=32-true", "evaluate.precision=fp32"]


# Module-scoped fixtures that train a model for several tests. Under pytest-xdist (``--dist loadgroup``)
# the tests that use one run in one process, which trains it once instead of once per process.
SHARED_RUNS = ("smoke_run", "attention_run", "reverse_checkpoint", "served_checkpoint")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of a shared run grouped on one process."""
    for item in items:
        shared = [name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.path.name}:{shared[0]}"))


def bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as a module (bench/ holds scripts, not a package: they import each
    other as ``python bench/<name>.py`` does, from bench/ on the path)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.append(str(bench))
    path = bench / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose_config(*overrides, fp32=True) -> the training config, in fp32 (:data:`FP32`) unless
    ``fp32=False`` (the config's own precision), writing only under tmp_path."""

    def _compose(*overrides: str, fp32: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    f"paths.output_dir={tmp_path / 'run'}",
                    f"paths.cache_dir={tmp_path / 'cache'}",
                    *(FP32 if fp32 else []),
                    *overrides,
                ],
            )

    return _compose


def tiny_model(**options) -> Seq2Seq:
    """A small random model over a 12-symbol vocabulary (4 specials + 8 words)."""
    torch.manual_seed(options.pop("seed", 0))
    settings = dict(embed_size=8, hidden_size=16, num_layers=1, dropout=0.0) | options
    return Seq2Seq(12, 12, **settings).eval()


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory) -> Path:
    """A tiny attention model trained on the synthetic reverse task (the smoke experiment): the server's
    tests (tests/test_serve.py, tests/test_serve_page.py) serve it."""
    from seq2seq.training import train

    root = tmp_path_factory.mktemp("served")
    overrides = [
        "experiment=smoke",
        "model.attention=bahdanau",
        "evaluate.test=false",
        "trainer.enable_progress_bar=false",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config", [f"paths.output_dir={root / 'run'}", f"paths.cache_dir={root / 'cache'}", *overrides]
        )
    train(cfg)
    return next((root / "run" / "checkpoints").glob("best-*.ckpt"))
