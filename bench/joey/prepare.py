"""Write the data folder Joey NMT trains on: our exact Bible splits and our sentencepiece model.

The splits are the ones ``train.py`` trains, validates and tests on (same hold-out, same over-long
training pairs dropped), written as plain text; the joint sentencepiece model is copied from our cache,
with a vocabulary file that lists every one of its pieces, so both toolkits see the same subwords.

    python bench/joey/prepare.py WORK_DIR [Hydra overrides of train.py, e.g. data.subword.vocab_size=8000]
"""

from __future__ import annotations

import sys
from pathlib import Path

import sentencepiece as spm
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

REPO = Path(__file__).resolve().parents[2]
LANGUAGES = ("de", "en")  # Joey's file suffixes for the source and target side


def main(work_dir: Path, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"paths.cache_dir={REPO / '.cache'}", "paths.output_dir=.", *overrides]
        )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    if not tokenizer.joint:
        raise ValueError("bench/joey needs a joint sentencepiece model (data.subword.joint=true)")
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        text = datamodule.texts[split]
        for lang, lines in zip(LANGUAGES, (text.src, text.tgt), strict=True):
            (data_dir / f"{split}.{lang}").write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8"
            )
        print(f"{split}: {len(text)} pairs ({text.origin})")
    (data_dir / "joint.model").write_bytes(tokenizer.src_model)
    processor = spm.SentencePieceProcessor(model_proto=tokenizer.src_model)
    # Joey adds its own <unk> <pad> <s> </s>; every other piece is listed in the model's own order.
    specials = {
        processor.id_to_piece(i)
        for i in range(processor.get_piece_size())
        if processor.is_control(i) or processor.is_unknown(i)
    }
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    (data_dir / "vocab.txt").write_text(
        "".join(p + "\n" for p in pieces if p not in specials), encoding="utf-8"
    )
    print(f"{data_dir}: joint.model and vocab.txt ({processor.get_piece_size()} pieces)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
