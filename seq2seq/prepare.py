"""Build the prepared data cache ahead of a training job: ``python -m seq2seq.prepare [overrides]``.

Takes the training config (``conf/config.yaml``) and the same ``data.*`` / ``paths.cache_dir``
overrides as ``train.py``; the training run then finds the cache and only checks it. Prints the
cache folder.
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from seq2seq.data import TranslationDataModule


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    datamodule: TranslationDataModule = instantiate(cfg.data)
    print(datamodule.prepared_folder())


if __name__ == "__main__":
    main()
