"""Translate a text file with a checkpoint: ``python translate.py ckpt=PATH input=FILE`` (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

from seq2seq.search import DecodingSettings
from seq2seq.translator import Translator, translate_file


@hydra.main(version_base="1.3", config_path="conf", config_name="translate")
def main(cfg: DictConfig) -> None:
    settings = DecodingSettings.from_config(cfg)  # the decoding group's keys; alpha=auto: the checkpoint's
    # ckpt=PATH, or ckpt=[PATH,PATH,...]: an ensemble
    paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    translator = Translator.from_checkpoints(paths, cfg.device)
    report = translate_file(
        translator, cfg.input, cfg.output, settings, cfg.chunk_lines, cfg.ref, cfg.progress
    )
    print(report, file=sys.stderr)


if __name__ == "__main__":
    main()
