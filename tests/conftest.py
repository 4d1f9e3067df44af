"""Shared fixtures: composed Hydra configs pointed at tmp_path, and tiny models."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from seq2seq.model import Seq2Seq

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


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
    """compose_config(*overrides) -> the training config, writing only under tmp_path."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    f"paths.output_dir={tmp_path / 'run'}",
                    f"paths.cache_dir={tmp_path / 'cache'}",
                    *overrides,
                ],
            )

    return _compose


def tiny_model(**options) -> Seq2Seq:
    """A small random model over a 12-symbol vocabulary (4 specials + 8 words)."""
    torch.manual_seed(options.pop("seed", 0))
    settings = dict(embed_size=8, hidden_size=16, num_layers=1, dropout=0.0) | options
    return Seq2Seq(12, 12, **settings).eval()
