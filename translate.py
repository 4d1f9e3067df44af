"""Translate a text file: ``python translate.py ckpt=PATH input=FILE``; ``--help`` lists the options."""

import sys

import hydra
from omegaconf import DictConfig

from seq2seq.checkpoints import require_file
from seq2seq.cli import command, quiet_third_party, run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="translate")
@command
def main(cfg: DictConfig) -> None:
    # ckpt=PATH, or ckpt=[PATH,PATH,...]: an ensemble
    paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    for path in paths:
        require_file(path)  # a missing checkpoint fails in a second, before torch loads
    import torch

    from seq2seq.search import DecodingSettings
    from seq2seq.translator import Translator, translate_file

    quiet_third_party()
    settings = DecodingSettings.from_config(cfg)  # the decoding group's keys; alpha=auto: the checkpoint's
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    translator = Translator.from_checkpoints(paths, device, cfg.precision)
    # A terminal on stdin: translate each line as it is entered, with no progress bar in the way.
    interactive = cfg.input == "-" and sys.stdin.isatty()
    report = translate_file(
        translator, cfg.input, cfg.output, settings, 1 if interactive else cfg.chunk_lines, cfg.ref,
        cfg.progress and not interactive,
    )  # fmt: skip
    print(report, file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
