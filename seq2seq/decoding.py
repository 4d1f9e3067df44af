"""Decoding settings: the one place that holds the decoding defaults and checks them.

Plain Python (no torch), so the commands' config group (``conf/decoding``) is built from it without
loading torch: ``python train.py --help`` and a mistyped key answer at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from seq2seq.errors import UserError, is_int, is_number

AUTO = "auto"
# Target pieces a lexical shortlist keeps per source piece (seq2seq/shortlist.py): the largest shortlist_k.
SHORTLIST_DEPTH = 100
QUANTIZE = ("auto", "int8", "none")
# What ``alpha=auto`` means for a model whose length penalty was never chosen on a validation split.
UNTUNED_ALPHA = 1.0


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode: the one place that holds the decoding defaults and checks them.

    The config group ``decoding`` (``conf/decoding/default.yaml``) is built from these fields, and
    validation, test scoring, ``translate.py``, :class:`~seq2seq.translator.Translator` and ``bench/``
    all read it. ``beam=1`` is greedy search. ``alpha`` is the GNMT length penalty exponent, or
    ``"auto"``: after training, the value of ``evaluate.alpha_grid`` that gives the best BLEU on the
    validation split, stored in the best checkpoint (a model without one uses ``UNTUNED_ALPHA``).
    At most ``max_len_a * source_length + max_len_b`` output subwords, at least ``min_len`` (where the
    limit allows). ``nbest`` hypotheses per sentence; ``batch_tokens`` padded source tokens x beam per
    batch.

    Faster decoding (docs/translating.md#faster-decoding): with ``shortlist`` each sentence scores only
    its lexical shortlist, EOS, the ``shortlist_frequent`` most frequent target pieces and the
    ``shortlist_k`` most likely translations of each of its source pieces (from the training data; a
    checkpoint's is built on first use and kept beside it); validation during training decodes without.
    ``quantize=int8``: the LSTMs and linear layers run as int8 (PyTorch's dynamic quantization);
    ``auto``: int8 where decoding would run in fp32 on a CPU, none in bf16 (as fast there) or on a GPU.
    """

    beam: int = 5
    alpha: float | str = AUTO
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 0
    nbest: int = 1
    batch_tokens: int = 24_000
    shortlist: bool = True
    shortlist_k: int = 20
    shortlist_frequent: int = 100
    quantize: str = AUTO

    def __post_init__(self) -> None:
        def check(ok: bool, option: str, rule: str) -> None:
            if not ok:
                raise UserError(f"{option} must be {rule}, got {getattr(self, option)!r}")

        check(is_int(self.beam) and self.beam >= 1, "beam", "an integer of at least 1")
        check(is_int(self.nbest) and 1 <= self.nbest <= self.beam, "nbest", f"between 1 and beam={self.beam}")
        alpha_ok = self.alpha == AUTO or (is_number(self.alpha) and 0 <= self.alpha < math.inf)
        check(alpha_ok, "alpha", f"a number >= 0 or {AUTO!r}")
        check(is_number(self.max_len_a) and 0 <= self.max_len_a < math.inf, "max_len_a", "a number >= 0")
        # Every sentence may then end: its limit is at least max_len_b, and min_len never exceeds it.
        check(is_int(self.max_len_b) and self.max_len_b >= 1, "max_len_b", "an integer of at least 1")
        check(
            is_int(self.min_len) and 0 <= self.min_len <= self.max_len_b,
            "min_len",
            f"an integer between 0 and max_len_b={self.max_len_b} (a longer minimum than a short"
            " sentence's length limit would leave it no way to end)",
        )
        check(is_int(self.batch_tokens) and self.batch_tokens >= 1, "batch_tokens", "a positive integer")
        check(isinstance(self.shortlist, bool), "shortlist", "true or false")
        depth = f"an integer between 1 and {SHORTLIST_DEPTH}"
        check(is_int(self.shortlist_k) and 1 <= self.shortlist_k <= SHORTLIST_DEPTH, "shortlist_k", depth)
        check(
            is_int(self.shortlist_frequent) and self.shortlist_frequent >= 0,
            "shortlist_frequent",
            "an integer >= 0",
        )
        check(self.quantize in QUANTIZE, "quantize", f"one of {', '.join(QUANTIZE)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], prefix: str = "") -> DecodingSettings:
        """The settings among ``config``'s keys (others are ignored); a bad value raises a ValueError
        naming the option as ``prefix + name`` (e.g. ``decoding.beam``)."""
        try:
            return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})
        except UserError as err:
            raise UserError(f"{prefix}{err}") from None

    def with_alpha(self, alpha: float) -> DecodingSettings:
        """These settings with ``alpha=auto`` replaced by ``alpha`` (a number is kept as it is)."""
        return self if self.alpha != AUTO else DecodingSettings(**{**asdict(self), "alpha": alpha})

    def greedy(self) -> DecodingSettings:
        """Greedy search with these length limits: what validation decodes with."""
        return DecodingSettings(**{**asdict(self), "beam": 1, "nbest": 1, "alpha": 0.0})
