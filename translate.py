"""Translate a text file: ``python translate.py ckpt=PATH input=FILE``; ``--help`` lists the options."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from seq2seq.checkpoints import require_file
from seq2seq.cli import command, quiet_third_party, reject_added_keys, run_cli
from seq2seq.errors import MissingFileError, UserError


def check_paths(cfg: DictConfig) -> list[str]:
    """The checkpoints (``ckpt=PATH``, or ``ckpt=[PATH,PATH,...]``: an ensemble), with every path option
    checked first: a mistake fails in a second, not after the model has loaded."""
    paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    for path in paths:
        require_file(path)
    for option, what in (("input", "Input file"), ("ref", "Reference file")):
        value = cfg[option]
        if value not in (None, "-") and not Path(value).is_file():
            if Path(value).is_dir():
                raise UserError(f"{what} is a directory: {value}")
            raise MissingFileError(f"{what} not found: {value}")
    if cfg.output != "-" and Path(cfg.output).is_dir():
        raise UserError(f"Output is a directory, not a file: {cfg.output}")
    if cfg.output != "-" and not Path(cfg.output).resolve().parent.is_dir():
        raise MissingFileError(f"Output folder not found: {Path(cfg.output).resolve().parent}")
    return paths


@hydra.main(version_base="1.3", config_path="conf", config_name="translate")
@command
def main(cfg: DictConfig) -> None:
    reject_added_keys(cfg)  # translate.py's options are those of its config: +beems=5 is a typo
    paths = check_paths(cfg)
    import torch

    from seq2seq.decoding import DecodingSettings
    from seq2seq.translator import Translator, translate_file

    quiet_third_party()
    settings = DecodingSettings.from_config(cfg)  # the decoding group's keys; alpha=auto: the checkpoint's
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    translator = Translator.from_checkpoints(paths, device, cfg.precision)
    # A terminal on stdin: translate each line as it is entered, after a prompt, with no progress bar.
    interactive = cfg.input == "-" and sys.stdin.isatty()
    if interactive:
        print("Ready: type a sentence and press Enter; Ctrl-D ends.", file=sys.stderr, flush=True)
    report = translate_file(
        translator, cfg.input, cfg.output, settings, 1 if interactive else cfg.chunk_lines, cfg.ref,
        cfg.progress and not interactive, "> " if interactive else "",
    )  # fmt: skip
    print(report, file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
