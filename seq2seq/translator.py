"""Translate sentences with a trained model: the Python API behind ``translate.py`` and test scoring."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from seq2seq.checkpoints import load_trained_model
from seq2seq.data.collate import length_sorted_batches, pad
from seq2seq.data.text import read_lines, read_text_lines
from seq2seq.errors import MissingFileError, UserError, user_path
from seq2seq.files import atomic_write
from seq2seq.metrics import CorpusScores, corpus_scores
from seq2seq.model import Ensemble, Seq2Seq
from seq2seq.precision import decoding_autocast, resolve_decoding_precision
from seq2seq.search import (
    AUTO,
    UNTUNED_ALPHA,
    DecodingSettings,
    Hypothesis,
    beam_candidates,
    decode,
)
from seq2seq.shortlist import LexicalTable, load_or_build
from seq2seq.tokenization import BOS_ID, Tokenizer

log = logging.getLogger(__name__)


class Translator:
    """Batched translation that keeps the input's order and length.

    Every input sentence gives exactly one output (or ``nbest`` outputs): a blank input gives an empty
    translation, and an input longer than ``max_src_len`` subwords is truncated with a warning.
    Decoding settings with ``alpha="auto"`` use ``alpha``: the length penalty chosen for this model on
    its validation split (None: there is none, and ``UNTUNED_ALPHA`` is used). ``tgt_lang`` and
    ``bleu_tokenize`` choose BLEU's tokenizer when scoring.

    ``precision`` is ``fp32``, ``bf16`` (the model runs under bf16 autocast; the weights stay fp32) or
    ``auto`` (bf16 on a CPU that runs it natively, see :mod:`seq2seq.precision`; fp32 elsewhere).

    The decoding settings' ``shortlist`` needs a lexical table: a translator loaded from a checkpoint
    reads or builds it on first use (:func:`~seq2seq.shortlist.load_or_build`); ``lexical_table`` gives
    one, and without either the whole vocabulary is scored. ``quantize=int8`` (or ``auto`` in fp32 on
    a CPU) decodes with an int8 copy of the model, made on first use (on the CPU, without autocast).
    """

    def __init__(
        self,
        model: Seq2Seq | Ensemble,
        tokenizer: Tokenizer,
        max_src_len: int,
        device: str | torch.device = "cpu",
        alpha: float | None = None,
        tgt_lang: str | None = None,
        bleu_tokenize: str | None = None,
        precision: str = "fp32",
        lexical_table: LexicalTable | Callable[[], LexicalTable | None] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.precision = resolve_decoding_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_src_len = max_src_len
        self.alpha = alpha
        self._warned_untuned = False
        self.tgt_lang = tgt_lang
        self.bleu_tokenize = bleu_tokenize
        self.run_config: dict = {}  # the training run's resolved configuration, when loaded from a checkpoint
        # The table, or what reads or builds it when a search first asks for a shortlist.
        self._lexical_table = lexical_table
        self._int8_model: torch.nn.Module | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> Translator:
        """Load a ``.ckpt`` written by training; it holds the weights, tokenizer and configuration."""
        return cls.from_checkpoints([path], device, precision)

    @classmethod
    def from_checkpoints(
        cls, paths: Sequence[str | Path], device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> Translator:
        """One checkpoint, or several of one vocabulary that decode as an ensemble: at each step, the
        next-token log-probabilities of the models are averaged. The length penalty for ``alpha=auto``
        and BLEU's language are the first checkpoint's."""
        trained = [load_trained_model(path, device) for path in paths]
        first = trained[0]
        for path, other in zip(paths[1:], trained[1:], strict=True):
            if other.tokenizer.state_dict() != first.tokenizer.state_dict():
                raise UserError(
                    f"An ensemble needs one vocabulary: {path} has another sentencepiece model"
                    f" than {paths[0]}"
                )
        max_src_len = min(t.run_config.get("data", {}).get("max_len", 256) for t in trained)
        model = first.model if len(trained) == 1 else Ensemble([t.model for t in trained])
        alpha = None if first.decoding.alpha == AUTO else first.decoding.alpha
        # The first checkpoint's training data gives the shortlist (an ensemble shares its vocabulary).
        table = functools.partial(load_or_build, paths[0], first.tokenizer, first.run_config)
        translator = cls(
            model, first.tokenizer, max_src_len, device, alpha, first.tgt_lang, first.bleu_tokenize,
            precision, table,
        )  # fmt: skip
        translator.run_config = first.run_config
        return translator

    def settings(
        self, settings: DecodingSettings | None = None, **options: int | float | str
    ) -> DecodingSettings:
        """``settings`` (default: :class:`DecodingSettings` with ``options``) with ``alpha=auto`` resolved
        to this model's length penalty."""
        settings = settings or DecodingSettings(**options)
        if settings.alpha == AUTO and settings.beam > 1 and self.alpha is None and not self._warned_untuned:
            log.warning(
                "alpha=auto, but no length penalty was chosen for this model on validation data (only a"
                " best checkpoint gets one, after a run with decoding.alpha=auto that validated at least"
                " evaluate.min_validations times and found one alpha better): using alpha=%s",
                UNTUNED_ALPHA,
            )
            self._warned_untuned = True
        return settings.with_alpha(UNTUNED_ALPHA if self.alpha is None else self.alpha)

    def translate(
        self, sentences: Sequence[str], first_line: int = 1, **options: int | float | str
    ) -> list[str]:
        """Translate ``sentences`` into as many strings, in order.

        ``options`` are :class:`DecodingSettings` fields (``beam``, ``alpha``, ``max_len_a``, ...).
        """
        settings = self.settings(**options)
        return [hyps[0][0] for hyps in self.translate_nbest(sentences, settings, first_line)]

    def translate_nbest(
        self, sentences: Sequence[str], settings: DecodingSettings | None = None, first_line: int = 1
    ) -> list[list[tuple[str, Hypothesis]]]:
        """Per sentence, its ``settings.nbest`` best (text, hypothesis) pairs, best first (fewer where
        fewer exist).

        ``first_line`` is the line number of ``sentences[0]`` in its file, for warnings.
        """
        settings = self.settings(settings)
        search = functools.partial(decode, self.decoding_model(settings), settings=settings)
        return self._with_texts(self._hypotheses(sentences, search, settings, first_line))

    def int8(self, settings: DecodingSettings) -> bool:
        """Whether ``settings`` decode with the int8 model: ``quantize=int8``, or ``auto`` where this
        translator decodes in fp32 on the CPU."""
        if settings.quantize == AUTO:
            return self.precision == "fp32" and self.device.type == "cpu"
        return settings.quantize == "int8"

    def decoding_model(self, settings: DecodingSettings) -> Seq2Seq | Ensemble:
        """The model that decodes with ``settings``: this one, or its int8 copy (see :meth:`int8`)."""
        if not self.int8(settings):
            return self.model
        if self.device.type != "cpu":
            raise UserError(
                f"quantize=int8 runs on the CPU only (device is {self.device}); use quantize=none"
            )
        if self._int8_model is None:
            self._int8_model = quantize_int8(self.model)
        return self._int8_model

    def lexical_table(self) -> LexicalTable | None:
        """The lexical table for shortlists (read or built on first use), or None where there is none."""
        if callable(self._lexical_table):
            self._lexical_table = self._lexical_table()
        return self._lexical_table

    def _with_texts(self, results: list[list[Hypothesis]]) -> list[list[tuple[str, Hypothesis]]]:
        """Each hypothesis with its detokenized text (decoded in one call)."""
        texts = iter(self.tokenizer.decode_tgt([h.tokens for hyps in results for h in hyps]))
        return [[(next(texts), h) for h in hyps] for hyps in results]

    def beam_candidates(
        self, sentences: Sequence[str], settings: DecodingSettings
    ) -> list[list[tuple[str, Hypothesis]]]:
        """Per sentence, the (text, hypothesis) pairs that beam search finished, from which the best for
        any length penalty can be picked (see :func:`~seq2seq.search.beam_candidates`)."""
        search = functools.partial(beam_candidates, self.decoding_model(settings), settings=settings)
        return self._with_texts(self._hypotheses(sentences, search, settings, first_line=1))

    @torch.no_grad()
    def align(self, sentence: str, settings: DecodingSettings | None = None) -> Alignment:
        """Translate one sentence and return the attention of each output subword over the source.

        Needs a model with attention. The weights are those of the model re-reading its own best
        translation, the way it produced it.
        """
        if not isinstance(self.model, Seq2Seq) or self.model.decoder.attention is None:
            raise UserError("align needs a single model trained with attention (model.attention)")
        (hypothesis,) = [hyps[0][1] for hyps in self.translate_nbest([sentence], settings)]
        source = self.tokenizer.encode_src([sentence.strip()])[0][: self.max_src_len]
        if not source:
            return Alignment([], [], torch.zeros(0, 0))
        src = torch.tensor([source], device=self.device)
        tgt_in = torch.tensor([[BOS_ID, *hypothesis.tokens]], device=self.device)
        with decoding_autocast(self.device, self.precision):
            _, weights = self.model.forward_with_attention(src, torch.tensor([len(source)]), tgt_in)
        return Alignment(
            source=[self.tokenizer.src.id_to_piece(i) for i in source],
            target=[self.tokenizer.tgt.id_to_piece(i) for i in hypothesis.tokens] + ["</s>"],
            weights=weights[0].float().cpu(),
        )

    def _hypotheses(
        self,
        sentences: Sequence[str],
        search: Callable[..., list[list[Hypothesis]]],
        settings: DecodingSettings,
        first_line: int,
    ) -> list[list[Hypothesis]]:
        """``search(src, src_lengths, shortlist=...)`` over batches of ``sentences``; a blank one gets
        ``nbest`` empty hypotheses."""
        ids = self.tokenizer.encode_src([s.strip() for s in sentences])
        results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] * settings.nbest for _ in sentences]
        todo = [i for i, seq in enumerate(ids) if seq]
        for i in todo:
            if len(ids[i]) > self.max_src_len:
                log.warning(
                    "input line %d: %d subwords, truncated to the model's maximum of %d",
                    first_line + i, len(ids[i]), self.max_src_len,
                )  # fmt: skip
                ids[i] = ids[i][: self.max_src_len]
        # Beams multiply the rows of a batch, so the budget of source tokens shrinks with the beam.
        budget = max(settings.batch_tokens // settings.beam, self.max_src_len)
        table = self.lexical_table() if settings.shortlist else None
        # The int8 model computes in fp32 around its int8 layers: no autocast.
        precision = "fp32" if self.int8(settings) else self.precision
        for batch in length_sorted_batches([len(ids[i]) for i in todo], budget):
            rows = [todo[b] for b in batch]
            src = pad([ids[i] for i in rows]).to(self.device)
            lengths = torch.tensor([len(ids[i]) for i in rows])
            shortlist = None
            if table is not None:
                shortlist = table.shortlist(
                    [ids[i] for i in rows], settings.shortlist_k, settings.shortlist_frequent
                )
            with decoding_autocast(self.device, precision):
                hypotheses = search(src, lengths, shortlist=shortlist)
            for row, hyps in zip(rows, hypotheses, strict=True):
                results[row] = hyps
        return results


def quantize_int8(model: Seq2Seq | Ensemble) -> torch.nn.Module:
    """A copy of ``model`` whose LSTMs and linear layers (the output projection among them) compute in
    int8: PyTorch's dynamic quantization (weights int8 per tensor, activations quantized per call)."""
    import warnings

    with warnings.catch_warnings():
        # torch 2.13 notes that eager-mode quantization and quantized tensors move to torchao (whose int8
        # covers no LSTM): a notice for this project, not for its users.
        warnings.filterwarnings("ignore", message=".*(quantiz|torchao)", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(quantiz|torchao)", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8
        )


@dataclass
class Alignment:
    """Attention of a translation over its source: ``weights[i, j]`` is how much output subword
    ``target[i]`` (the last one is the end of sentence) attended to source subword ``source[j]``;
    each row sums to 1."""

    source: list[str]
    target: list[str]
    weights: torch.Tensor


@dataclass
class FileReport:
    """What :func:`translate_file` did: counts, timing and, given references, the scores."""

    sentences: int
    output_tokens: int
    seconds: float
    scores: CorpusScores | None = None

    def __str__(self) -> str:
        seconds = max(self.seconds, 1e-9)
        rate = f"{self.sentences / seconds:.1f} sentences/s, {self.output_tokens / seconds:.0f} tokens/s"
        text = f"Translated {self.sentences} lines in {self.seconds:.1f} s ({rate})"
        return text if self.scores is None else f"{text}\n{self.scores}"


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prompted(lines: Iterator[str], prompt: str) -> Iterator[str]:
    """``lines``, with ``prompt`` written to stderr before each is read (none if it is empty)."""
    while True:
        if prompt:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = next(lines, None)
        if line is None:
            if prompt:  # the report goes on a line of its own, not after the last prompt
                print(file=sys.stderr)
            return
        yield line


def translate_file(
    translator: Translator,
    input_path: str,
    output_path: str,
    settings: DecodingSettings | None = None,
    chunk_lines: int = 5000,
    ref_path: str | None = None,
    progress: bool = True,
    prompt: str = "",
) -> FileReport:
    """Translate a file (``-`` is stdin/stdout) line by line, streaming ``chunk_lines`` at a time.

    Writes exactly one output line per input line, in order (with ``nbest > 1``, ``nbest`` lines of
    ``index ||| translation ||| score`` per input line, index counted from 0; fewer where fewer exist
    within the length limit and the shortlist). A file output appears only when complete (written to a
    temporary file, then renamed). With ``ref_path``, scores the translations against it with
    sacrebleu (BLEU tokenized for the translator's target language).
    ``prompt`` is written to stderr before each line is read (a terminal on stdin). The report's time is
    the time spent translating, not waiting for input.
    """
    settings = translator.settings(settings)
    if input_path != "-" and not Path(input_path).is_file():
        raise MissingFileError(f"Input file not found: {input_path}")
    references = read_lines(ref_path) if ref_path is not None else None
    total = None
    if input_path != "-":
        with user_path(input_path, "input"), open(input_path, "rb") as f:
            total = sum(1 for _ in f)
        if references is not None and len(references) != total:
            raise UserError(f"{ref_path} has {len(references)} lines but {input_path} has {total}")

    with contextlib.ExitStack() as stack:
        source = sys.stdin.buffer if input_path == "-" else stack.enter_context(open(input_path, "rb"))
        if output_path == "-":
            sink = sys.stdout
        else:
            out_dir = Path(output_path).resolve().parent
            if not out_dir.is_dir():
                raise MissingFileError(f"Output folder not found: {out_dir}")
            with user_path(output_path, "output"):  # no permission to write in its folder
                sink = stack.enter_context(atomic_write(output_path, "w", encoding="utf-8"))
        bar = stack.enter_context(
            tqdm(total=total, unit="line", file=sys.stderr, disable=not progress, desc="Translating")
        )
        seconds = 0.0
        count = tokens = 0
        kept: list[str] = []
        for chunk in _chunks(_prompted(read_text_lines(source, input_path), prompt), chunk_lines):
            started = time.perf_counter()
            results = translator.translate_nbest(chunk, settings, first_line=count + 1)
            for offset, hyps in enumerate(results):
                tokens += len(hyps[0][1].tokens)
                if settings.nbest == 1:
                    sink.write(hyps[0][0] + "\n")
                else:
                    sink.writelines(f"{count + offset} ||| {text} ||| {h.score:.4f}\n" for text, h in hyps)
                if references is not None:
                    kept.append(hyps[0][0])
            sink.flush()
            seconds += time.perf_counter() - started
            count += len(chunk)
            bar.update(len(chunk))

    scores = None
    if references is not None:
        if len(references) != count:
            raise UserError(f"{ref_path} has {len(references)} lines but the input had {count}")
        scores = corpus_scores(kept, references, translator.tgt_lang, translator.bleu_tokenize)
    return FileReport(count, tokens, seconds, scores)
