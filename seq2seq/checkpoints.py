"""Checkpoint files: reading them with errors that name the file, and the edits a run makes to them
(``last.ckpt`` at the end of training, the chosen length penalty in the best checkpoint)."""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seq2seq.decoding import DecodingSettings
from seq2seq.errors import MissingFileError, UserError, user_path
from seq2seq.files import atomic_write

if TYPE_CHECKING:
    import lightning as L
    import torch

    from seq2seq.model import Seq2Seq
    from seq2seq.tokenization import Tokenizer

log = logging.getLogger(__name__)

# What loading a truncated, corrupt or foreign checkpoint raises.
UNLOADABLE_CHECKPOINT = (
    RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
)  # fmt: skip


def require_file(path: str | Path) -> Path:
    """``path`` as a Path; MissingFileError naming it if there is no such file, or a UserError
    listing the checkpoints inside if it is a folder (a run directory given for its checkpoint)."""
    path = Path(path)
    if path.is_dir():
        # In it, or two levels down: a run directory's checkpoints/best-*.ckpt.
        inside = sorted(
            str(p.relative_to(path)) for depth in ("", "*/", "*/*/") for p in path.glob(f"{depth}*.ckpt")
        )
        more = f" and {len(inside) - 8} more" if len(inside) > 8 else ""
        listed = f"checkpoints in it: {', '.join(inside[:8])}{more}" if inside else "no .ckpt file in it"
        raise UserError(f"Checkpoint path is a directory: {path} ({listed})")
    if not path.is_file():
        raise MissingFileError(f"Checkpoint not found: {path}")
    return path


def read_checkpoint(
    path: str | Path, required: Sequence[str] = ("state_dict", "tokenizer")
) -> dict[str, Any]:
    """The checkpoint dict at ``path``; a UserError naming the path if it is missing, unreadable, or
    lacks the ``required`` entries of this toolkit's checkpoints."""
    import torch  # here, so that require_file answers before torch loads (translate.py's early checks)

    require_file(path)
    try:
        with user_path(path):
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except UNLOADABLE_CHECKPOINT as err:
        raise UserError(f"Cannot load checkpoint {path}: truncated or not a checkpoint ({err})") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this toolkit (no {missing})")
    return checkpoint


@dataclass
class TrainedModel:
    """What a training checkpoint holds for translating: the network (in eval mode), its tokenizer, the
    run's decoding settings (``alpha`` as chosen after training), BLEU's target language and tokenizer,
    and the run's resolved configuration."""

    model: Seq2Seq
    tokenizer: Tokenizer
    decoding: DecodingSettings
    tgt_lang: str | None
    bleu_tokenize: str | None
    run_config: dict[str, Any]


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The model of a training checkpoint, built from its saved settings without Lightning (translating
    needs the network, the tokenizer and the settings, not the training module); a clear error for a
    missing or unusable file.

    The LightningModule keeps the network as its ``model`` attribute, so its weights are the
    ``model.``-prefixed entries of the checkpoint's ``state_dict`` (the averaged ones where
    ``module.ema_decay`` was on: :class:`~seq2seq.ema.WeightAverage` writes them there).
    """
    from seq2seq.model import Seq2Seq  # torch loads here, not for translate.py's early checks
    from seq2seq.tokenization import Tokenizer

    checkpoint = read_checkpoint(path, required=("state_dict", "tokenizer", "hyper_parameters"))
    settings = checkpoint["hyper_parameters"]
    try:
        with user_path(path):
            model = Seq2Seq(settings["src_vocab_size"], settings["tgt_vocab_size"], **settings["model"])
            weights = {
                name.removeprefix("model."): value
                for name, value in checkpoint["state_dict"].items()
                if name.startswith("model.")
            }
            model.load_state_dict(weights)
    except UNLOADABLE_CHECKPOINT as err:
        raise UserError(
            f"Cannot load checkpoint {path}: not a complete checkpoint of this toolkit ({err})"
        ) from None
    return TrainedModel(
        model=model.to(device).eval(),
        tokenizer=Tokenizer.from_state_dict(checkpoint["tokenizer"]),
        decoding=DecodingSettings.from_config(settings.get("decoding") or {}, prefix="decoding."),
        tgt_lang=settings.get("tgt_lang"),
        bleu_tokenize=settings.get("bleu_tokenize"),
        run_config=checkpoint.get("run_config") or {},
    )


def check_resume_checkpoint(
    path: str, max_time: str | timedelta | None = None, training_may_be_done: bool = False
) -> None:
    """Fail clearly, before training starts, if ``ckpt_path`` is not a training checkpoint of ours, or if
    the run it resumes has already used up ``max_time`` (``trainer.max_time`` counts the whole run:
    Lightning's Timer carries the time trained in the checkpoint).

    A run that resumes itself (``training_may_be_done``: a requeued SLURM job, a sweep's retry of a
    trial) may have been stopped after its training ended, in the evaluation: with its time used up it
    goes on, says so, and trains no step (Lightning's Timer stops ``fit`` at its start), then evaluates.
    """
    from seq2seq.run_clock import budget_seconds, checkpoint_elapsed_seconds, clock

    try:
        checkpoint = read_checkpoint(path, required=("state_dict", "tokenizer", "loops"))
    except UserError as err:
        raise type(err)(f"ckpt_path: {err}") from None
    elapsed = checkpoint_elapsed_seconds(checkpoint)
    if max_time is None or elapsed is None:
        return
    if elapsed >= budget_seconds(max_time):
        if training_may_be_done:
            log.info(
                "ckpt_path: the run has already trained for %s, all of trainer.max_time=%s: its training is"
                " done: going on to the evaluation",
                clock(elapsed),
                max_time,
            )
            return
        raise UserError(
            f"ckpt_path: the run has already trained for {clock(elapsed)}, all of"
            f" trainer.max_time={max_time}, which counts the whole run across resumes: give a larger"
            " trainer.max_time to train on"
        )


def read_init_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint ``init_from`` names (weights, tokenizer and model settings); a one-line error
    naming the option if it is missing or not a checkpoint of this toolkit's translation models."""
    try:
        checkpoint = read_checkpoint(path, required=("state_dict", "tokenizer", "hyper_parameters"))
    except UserError as err:
        raise type(err)(f"init_from: {err}") from None
    if not isinstance(checkpoint["hyper_parameters"].get("model"), dict):
        raise UserError(f"init_from: {path} is not a checkpoint of this toolkit (no model settings)")
    return checkpoint


def check_architecture(
    composed: dict[str, Any], checkpoint: dict[str, Any], overrides: Sequence[str]
) -> None:
    """Fine-tuning takes the model's architecture from the checkpoint: a ``model.KEY=VALUE`` (or
    ``model=NAME``) command-line override that asks for another is a ValueError naming the key.

    ``composed`` is the composed ``model`` config, ``checkpoint`` the checkpoint's, ``overrides`` the
    command line's overrides (Hydra's ``overrides.task``); settings only the config files set differ
    freely (the checkpoint's win).
    """
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "model":
            differing = [
                k for k in sorted(composed.keys() | checkpoint.keys()) if composed.get(k) != checkpoint.get(k)
            ]
            if differing:
                first = differing[0]
                raise UserError(
                    f"init_from: {override} conflicts with the checkpoint's architecture (model.{first}:"
                    f" {composed.get(first)!r} here, {checkpoint.get(first)!r} in the checkpoint); drop it"
                )
        elif key.startswith("model."):
            path = key.removeprefix("model.").split(".")
            here, there = composed, checkpoint
            for part in path:
                here = here.get(part) if isinstance(here, dict) else None
                there = there.get(part) if isinstance(there, dict) else None
            if here != there:
                raise UserError(
                    f"init_from: {key}={value} conflicts with the checkpoint's {key}={there!r}: the"
                    " architecture comes from the checkpoint; drop the override"
                )


def save_resume_checkpoint(trainer: L.Trainer, path: Path, stopped: str, alone: bool = False) -> None:
    """Save ``path`` for the run to resume from, its loop counts saying where training really stopped:
    the one place that saves a checkpoint on stopping. Every process calls it, unless ``alone``: then
    only the first process does, and no collective runs (:func:`~seq2seq.private_apis.save_checkpoint_alone`).
    ``stopped`` is when:

    - ``"fit ended"``: ``fit`` returned (max_steps, max_time, early stopping, the last epoch). An epoch
      served whole becomes the start of the next one, a stop inside one is undone as an epoch's end
      (:func:`~seq2seq.private_apis.restart_finished_epoch`);
    - ``"in a batch"``: Ctrl-C or an error while a batch was under way: the run's counts end at the
      last trained batch (:func:`~seq2seq.private_apis.settle_unfinished_batch`);
    - ``"training goes on"``: SLURM's requeue signal, acted on at a batch's start (no batch under way),
      after which the run continues: its live counts stay as they are.
    """
    from seq2seq.private_apis import restart_finished_epoch, save_checkpoint_alone, settle_unfinished_batch

    if stopped == "fit ended":
        restart_finished_epoch(trainer)
    elif stopped == "in a batch":
        settle_unfinished_batch(trainer)
    elif stopped != "training goes on":
        raise ValueError(f"stopped must be 'fit ended', 'in a batch' or 'training goes on', got {stopped!r}")
    if alone:
        save_checkpoint_alone(trainer, path)
    else:
        trainer.save_checkpoint(path)


def save_last_checkpoint(trainer: L.Trainer) -> None:
    """Write ``last.ckpt`` now that training has ended (Lightning saves it at the end only if it never
    did), into the folder of each checkpoint callback that keeps one."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "save_last", False):
            save_resume_checkpoint(trainer, Path(callback.dirpath) / "last.ckpt", "fit ended")


def store_alpha(path: str | Path, alpha: float, bleu_by_alpha: dict[float, float]) -> None:
    """Write a chosen length penalty into a checkpoint's decoding settings (where translate.py's
    ``alpha=auto`` finds it), with the BLEU of each alpha it was chosen from; the file is replaced
    atomically."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["decoding"]["alpha"] = alpha
    checkpoint["alpha_choice"] = {"alpha": alpha, "bleu_by_alpha": bleu_by_alpha}
    with atomic_write(path) as file:
        torch.save(checkpoint, file)
