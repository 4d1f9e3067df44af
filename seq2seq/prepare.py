"""Build the prepared data cache ahead of a training job: ``python -m seq2seq.prepare [overrides]``.

Takes the training config (``conf/config.yaml``) and the same ``data.*`` / ``paths.cache_dir``
overrides as ``train.py``; the training run then finds the cache and only checks it. Prints the
cache folder.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from seq2seq.cli import command, quiet_third_party, run_cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
@command
def main(cfg: DictConfig) -> None:
    from hydra.utils import instantiate  # the data code loads only once the config is composed

    quiet_third_party()
    datamodule = instantiate(cfg.data)
    print(datamodule.build_or_reuse_cache())


if __name__ == "__main__":
    run_cli(main)
