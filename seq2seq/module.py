"""The LightningModule: teacher-forced training, validation loss and greedy-decoded BLEU/chrF."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from seq2seq.data.batching import Batch
from seq2seq.metrics import corpus_scores
from seq2seq.model import Seq2Seq
from seq2seq.search import greedy_search
from seq2seq.tokenization import PAD_ID, Tokenizer

SCHEDULERS = ("inverse_sqrt", "constant", "plateau")


class TranslationModule(L.LightningModule):
    """Wraps :class:`Seq2Seq` for training. Built from plain values, so a checkpoint alone restores it.

    Args:
        model: keyword arguments of :class:`Seq2Seq` other than the vocabulary sizes.
        src_vocab_size, tgt_vocab_size: from the tokenizer.
        optimizer: AdamW keyword arguments (``lr``, ``betas``, ``weight_decay``, ...).
        scheduler: ``name`` is ``inverse_sqrt`` (linear warmup over ``warmup_steps``, then decay with
            the inverse square root of the step), ``constant`` (warmup, then flat) or ``plateau``
            (multiply by ``factor`` after ``patience`` validations without a better BLEU).
        label_smoothing: mass spread uniformly over the vocabulary in the training loss.
        decoding: ``max_len_a`` and ``max_len_b`` of the greedy decoding used for validation BLEU.
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
    ) -> None:
        super().__init__()
        if scheduler.get("name") not in SCHEDULERS:
            raise ValueError(
                f"module.scheduler.name must be one of {SCHEDULERS}, got {scheduler.get('name')!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"module.label_smoothing must be in [0, 1), got {label_smoothing}")
        if optimizer.get("lr", 1e-3) <= 0:
            raise ValueError(f"module.optimizer.lr must be positive, got {optimizer['lr']}")
        self.save_hyperparameters()
        self.model = Seq2Seq(src_vocab_size, tgt_vocab_size, **model)
        self.decoding = decoding or {}
        self.tokenizer: Tokenizer | None = None  # set by the trainer script or restored from a checkpoint
        self.run_config: dict[str, Any] | None = None  # the resolved run configuration, kept in checkpoints
        self._val_nll = self._val_tokens = 0.0
        self._val_hypotheses: dict[int, str] = {}

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

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        nll, uniform = self.token_losses(batch)
        eps = self.hparams.label_smoothing
        loss = ((1.0 - eps) * nll + eps * uniform).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Non-finite training loss ({loss.item()}) at step {self.global_step}")
        self.log("train_loss", loss, prog_bar=True, batch_size=batch.src.size(0))
        self.log("train_ppl", nll.detach().mean().exp(), batch_size=batch.src.size(0))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_nll = self._val_tokens = 0.0
        self._val_hypotheses = {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        nll, _ = self.token_losses(batch)
        self._val_nll += float(nll.sum())
        self._val_tokens += nll.numel()
        hypotheses = greedy_search(self.model, batch.src, batch.src_lengths, **self.decoding)
        texts = self.tokenizer.decode_tgt([h.tokens for h in hypotheses])
        self._val_hypotheses.update(zip(batch.indices.tolist(), texts, strict=True))

    def on_validation_epoch_end(self) -> None:
        references = self.trainer.datamodule.texts["valid"].tgt
        indices = sorted(self._val_hypotheses)
        scores = corpus_scores([self._val_hypotheses[i] for i in indices], [references[i] for i in indices])
        val_loss = self._val_nll / max(self._val_tokens, 1)
        self.log_dict(
            {
                "val_loss": val_loss,
                "val_ppl": math.exp(min(val_loss, 50.0)),
                "val_bleu": scores.bleu,
                "val_chrf": scores.chrf,
            },
            prog_bar=True,
        )

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
            return {
                "optimizer": optimizer,
                # Not strict: with mid-epoch validation, an epoch may end before the first val_bleu.
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is None:
            raise RuntimeError("TranslationModule.tokenizer must be set before saving a checkpoint")
        checkpoint["tokenizer"] = self.tokenizer.state_dict()
        checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer = Tokenizer.from_state_dict(checkpoint["tokenizer"])
        self.run_config = checkpoint.get("run_config")
