"""The LightningModule: teacher-forced training, validation loss and greedy-decoded BLEU/chrF."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from seq2seq.data.batching import Batch
from seq2seq.metrics import check_bleu_tokenize, corpus_scores
from seq2seq.model import Seq2Seq
from seq2seq.search import DecodingSettings, decode
from seq2seq.tokenization import PAD_ID, Tokenizer

log = logging.getLogger(__name__)

SCHEDULERS = ("inverse_sqrt", "constant", "plateau")
NONFINITE_POLICIES = ("stop", "skip")


class TranslationModule(L.LightningModule):
    """Wraps :class:`Seq2Seq` for training. Built from plain values, so a checkpoint alone restores it.

    Args:
        model: keyword arguments of :class:`Seq2Seq` other than the vocabulary sizes.
        src_vocab_size, tgt_vocab_size: from the tokenizer.
        optimizer: AdamW keyword arguments (``lr``, ``betas``, ``weight_decay``, ...).
        scheduler: ``name`` is ``inverse_sqrt`` (linear warmup over ``warmup_steps``, then decay with
            the inverse square root of the step), ``constant`` (warmup, then flat) or ``plateau``
            (multiply by ``factor`` after ``patience`` validations without a better BLEU; it steps
            after each validation, so its patience counts validations, not epochs).
        label_smoothing: mass spread uniformly over the vocabulary in the training loss.
        decoding: :class:`DecodingSettings` fields (the run's ``decoding`` config). Validation decodes
            greedily with its length limits; after training, ``alpha`` is the one chosen for
            ``alpha=auto``, so a checkpoint carries its length penalty to the translator.
        tgt_lang, bleu_tokenize: the target language and BLEU tokenizer of validation BLEU (see
            :func:`~seq2seq.metrics.corpus_scores`).
        nonfinite_loss: what a step with a NaN or infinite loss does: ``stop`` raises an error naming
            the step; ``skip`` leaves the weights untouched, logs a warning and counts the step in
            ``train_skipped_steps``. Either way no update is made from a non-finite loss.

    Under data parallelism the loss is the mean over all target tokens of all processes, and the
    validation scores are those of the whole validation set: the per-sentence results of all processes
    are gathered before BLEU, chrF and the token-weighted loss are computed.
    """

    def __init__(
        self,
        model: dict[str, Any],
        src_vocab_size: int,
        tgt_vocab_size: int,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        label_smoothing: float = 0.1,
        decoding: dict[str, Any] | None = None,
        nonfinite_loss: str = "stop",
        tgt_lang: str | None = None,
        bleu_tokenize: str | None = None,
    ) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(
                f"module.nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}"
            )
        if scheduler.get("name") not in SCHEDULERS:
            raise ValueError(
                f"module.scheduler.name must be one of {SCHEDULERS}, got {scheduler.get('name')!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"module.label_smoothing must be in [0, 1), got {label_smoothing}")
        if optimizer.get("lr", 1e-3) <= 0:
            raise ValueError(f"module.optimizer.lr must be positive, got {optimizer['lr']}")
        self.decoding = DecodingSettings.from_config(decoding or {}, prefix="decoding.")
        self.tgt_lang, self.bleu_tokenize = tgt_lang, check_bleu_tokenize(bleu_tokenize)
        self.save_hyperparameters()
        self.model = Seq2Seq(src_vocab_size, tgt_vocab_size, **model)
        self.tokenizer: Tokenizer | None = None  # set by the trainer script or restored from a checkpoint
        self.run_config: dict[str, Any] | None = None  # the resolved run configuration, kept in checkpoints
        self.skipped_steps = 0
        # Per validation sentence index: (greedy translation, summed target NLL, target tokens).
        self._val_sentences: dict[int, tuple[str, float, int]] = {}

    def token_losses(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Per-token negative log-likelihood and mean negative log-prob over the vocabulary.

        Only the non-pad positions are projected to the vocabulary, which skips the padding's share of
        the largest matrix product. Returns two (num_target_tokens,) tensors.
        """
        outputs = self.model(batch.src, batch.src_lengths, batch.tgt_in)  # (B, T, H)
        real = batch.tgt_out != PAD_ID
        log_probs = self.model.logits(outputs[real]).float().log_softmax(dim=-1)  # (N, V)
        nll = -log_probs.gather(1, batch.tgt_out[real].unsqueeze(1)).squeeze(1)
        return nll, -log_probs.mean(dim=-1)

    def smoothed_losses(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The label-smoothed training loss and the NLL of each target token: two (N,) tensors."""
        nll, uniform = self.token_losses(batch)
        eps = self.hparams.label_smoothing
        return (1.0 - eps) * nll + eps * uniform, nll

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        losses, nll = self.smoothed_losses(batch)
        # Sums over all processes: their batches hold different numbers of target tokens.
        loss_sum, nll_sum, tokens = self.trainer.strategy.reduce(
            torch.stack([losses.detach().sum(), nll.detach().sum(), losses.new_tensor(nll.numel())]),
            reduce_op="sum",
        )
        if not torch.isfinite(loss_sum):
            return self._on_nonfinite_loss(float(loss_sum))
        self.log("train_loss", loss_sum / tokens, prog_bar=True, batch_size=batch.src.size(0))
        self.log("train_ppl", (nll_sum / tokens).exp(), batch_size=batch.src.size(0))
        # DDP averages gradients over processes; scaling by their number makes that a token mean.
        return losses.sum() * self.trainer.world_size / tokens

    def _on_nonfinite_loss(self, value: float) -> None:
        batch = self.trainer.fit_loop.epoch_loop.batch_idx
        where = f"at step {self.global_step} (epoch {self.current_epoch}, batch {batch})"
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(
                f"Non-finite training loss ({value}) {where}; module.nonfinite_loss=skip skips such steps"
            )
        self.skipped_steps += 1
        log.warning("Skipped a step with a non-finite training loss (%s) %s", value, where)
        self.log("train_skipped_steps", float(self.skipped_steps), reduce_fx="max")
        return None  # Lightning makes no backward pass and no update for this batch

    def on_validation_epoch_start(self) -> None:
        self._val_sentences = {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        nll, _ = self.token_losses(batch)
        real = batch.tgt_out != PAD_ID  # (B, T)
        rows = torch.arange(real.size(0), device=real.device).unsqueeze(1).expand_as(real)[real]
        sentence_nll = torch.zeros(real.size(0), device=nll.device).index_add_(0, rows, nll.float())
        hypotheses = decode(self.model, batch.src, batch.src_lengths, self.decoding.greedy())
        texts = self.tokenizer.decode_tgt([hyps[0].tokens for hyps in hypotheses])
        for index, text, nll_sum, tokens in zip(
            batch.indices.tolist(), texts, sentence_nll.tolist(), real.sum(dim=1).tolist(), strict=True
        ):
            # A sentence seen twice (batches repeated to balance processes) counts once.
            self._val_sentences[index] = (text, nll_sum, tokens)

    def on_validation_epoch_end(self) -> None:
        sentences = gather_dicts(self._val_sentences)
        references = self.trainer.datamodule.texts["valid"].tgt
        indices = sorted(sentences)
        scores = corpus_scores(
            [sentences[i][0] for i in indices],
            [references[i] for i in indices],
            self.tgt_lang,
            self.bleu_tokenize,
        )
        val_loss = sum(sentences[i][1] for i in indices) / max(sum(sentences[i][2] for i in indices), 1)
        # Every process computed the same values from the gathered sentences: nothing to reduce.
        self.log_dict(
            {
                "val_loss": val_loss,
                "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bleu": scores.bleu,
                "val_chrf": scores.chrf,
            },
            prog_bar=True,
        )
        scheduler = self.lr_schedulers()
        if (
            isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            and not self.trainer.sanity_checking
        ):
            scheduler.step(scores.bleu)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), **self.hparams.optimizer)
        settings = self.hparams.scheduler
        if settings["name"] == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="max",
                factor=settings.get("factor", 0.5),
                patience=settings.get("patience", 2),
            )
            # Lightning would step it at epoch ends only; it is stepped after each validation instead
            # (on_validation_epoch_end), and lr_scheduler_step leaves it alone.
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val_bleu", "strict": False},
            }
        warmup = max(int(settings.get("warmup_steps", 0)), 1)
        decay = settings["name"] == "inverse_sqrt"

        def factor(step: int) -> float:
            step += 1
            if step < warmup:
                return step / warmup
            return math.sqrt(warmup / step) if decay else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is None:
            raise RuntimeError("TranslationModule.tokenizer must be set before saving a checkpoint")
        checkpoint["tokenizer"] = self.tokenizer.state_dict()
        checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer = Tokenizer.from_state_dict(checkpoint["tokenizer"])
        self.run_config = checkpoint.get("run_config")


def gather_dicts(local: dict[int, Any]) -> dict[int, Any]:
    """The union of every process's ``local`` dict (just ``local`` when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    parts: list[dict[int, Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    return {key: value for part in parts for key, value in part.items()}
