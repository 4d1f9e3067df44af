"""Train a translation model: ``python train.py [overrides]`` (see README.md and conf/)."""

import hydra
from omegaconf import DictConfig

from seq2seq.training import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
