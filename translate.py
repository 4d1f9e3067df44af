"""Translate a text file with a checkpoint: ``python translate.py ckpt=PATH input=FILE`` (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

from seq2seq.translator import SearchSettings, Translator, translate_file


@hydra.main(version_base="1.3", config_path="conf", config_name="translate")
def main(cfg: DictConfig) -> None:
    settings = SearchSettings(cfg.beam, cfg.alpha, cfg.max_len_a, cfg.max_len_b, cfg.min_len, cfg.nbest)
    # ckpt=PATH, or ckpt=[PATH,PATH,...]: an ensemble
    paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    translator = Translator.from_checkpoints(paths, cfg.device, cfg.precision)
    report = translate_file(
        translator, cfg.input, cfg.output, settings, cfg.batch_tokens, cfg.chunk_lines, cfg.ref, cfg.progress
    )
    print(report, file=sys.stderr)


if __name__ == "__main__":
    main()
