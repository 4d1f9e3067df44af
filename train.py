"""Train a translation model: ``python train.py [overrides]``; ``--help`` lists the groups and options."""

import hydra
from omegaconf import DictConfig

from seq2seq.cli import command, run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@command
def main(cfg: DictConfig) -> float:
    from seq2seq.training import run  # torch and Lightning load only once the config is composed

    return run(cfg)


if __name__ == "__main__":
    run_cli(main)
