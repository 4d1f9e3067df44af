"""The LightningModule: teacher-forced training, validation loss and greedy-decoded BLEU/chrF."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch import Tensor

from seq2seq.data.collate import Batch
from seq2seq.decoding import DecodingSettings
from seq2seq.ema import WeightAverage
from seq2seq.errors import UserError, is_number
from seq2seq.metrics import check_bleu_tokenize, corpus_scores, mean_over_corpora, scores_by_corpus
from seq2seq.model import Seq2Seq
from seq2seq.model.loss import smoothed_cross_entropy
from seq2seq.precision import clip_gradients
from seq2seq.private_apis import should_update_logs
from seq2seq.schedules import BUDGET_SCHEDULES, STEP_SCHEDULES, build_scheduler
from seq2seq.search import decode
from seq2seq.tokenization import PAD_ID, Tokenizer

log = logging.getLogger(__name__)
# TranslationModule moves batches itself, on purpose, whatever data module feeds it.
warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device` in `Lightning")

SCHEDULERS = (*STEP_SCHEDULES, *BUDGET_SCHEDULES, "plateau")
NONFINITE_POLICIES = ("stop", "skip")


class TranslationModule(L.LightningModule):
    """Wraps :class:`Seq2Seq` for training. Built from plain values, so a checkpoint alone restores it.

    Args:
        model: keyword arguments of :class:`Seq2Seq` other than the vocabulary sizes.
        src_vocab_size, tgt_vocab_size: from the tokenizer.
        optimizer: AdamW keyword arguments (``lr``, ``betas``, ``weight_decay``, ...).
        scheduler: ``name`` is ``inverse_sqrt`` (linear warmup over ``warmup_steps``, then decay with
            the inverse square root of the step), ``constant`` (warmup, then flat), ``linear`` or
            ``cosine`` (warmup, then decay to ``floor`` x the peak, default 0, at the end of the budget
            of ``trainer.max_time`` or ``max_steps``: see :mod:`seq2seq.schedules`) or ``plateau``
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
        ema_decay: None, or the decay of an exponential moving average of the weights, which is
            validated, saved in the best checkpoints and scored on the test split, while the raw
            weights train on (see :class:`~seq2seq.ema.WeightAverage`).

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
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise UserError(
                f"module.nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}"
            )
        if scheduler.get("name") not in SCHEDULERS:
            raise UserError(
                f"module.scheduler.name must be one of {SCHEDULERS}, got {scheduler.get('name')!r}"
            )
        if not is_number(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"module.label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not is_number(lr := optimizer.get("lr", 1e-3)) or lr <= 0:
            raise UserError(f"module.optimizer.lr must be a positive number, got {lr!r}")
        self.decoding = DecodingSettings.from_config(decoding or {}, prefix="decoding.")
        self.tgt_lang, self.bleu_tokenize = tgt_lang, check_bleu_tokenize(bleu_tokenize)
        self.save_hyperparameters()
        self.model = Seq2Seq(src_vocab_size, tgt_vocab_size, **model)
        self.weight_average = WeightAverage(ema_decay) if ema_decay is not None else None
        self.tokenizer: Tokenizer | None = None  # set by the trainer script or restored from a checkpoint
        self.run_config: dict[str, Any] | None = None  # the resolved run configuration, kept in checkpoints
        # Non-finite losses, recorded on the device: found in this optimizer step (what fused AdamW reads
        # as found_inf), steps skipped so far, and (step, loss) of the first one.
        self._found_inf: Tensor | None = None
        self._skipped: Tensor | None = None
        self._first_nonfinite: Tensor | None = None
        self._skipped_reported = 0
        # Of the optimizer step being accumulated: [first micro-batch's tokens, all tokens, micro-batches].
        self._window: list[Any] | None = None
        # Per validation sentence index: (greedy translation, summed target NLL, target tokens).
        self._val_sentences: dict[int, tuple[str, float, int]] = {}

    def target_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The scores of the real (non-pad) target positions, (N, V), and their target ids, (N,).

        Only the non-pad positions are projected to the vocabulary, which skips the padding's share of
        the largest matrix product. Their number is known from the collate step, so finding them does
        not wait for the device (a boolean-mask index would).
        """
        outputs = self.model(batch.src, batch.src_lengths, batch.tgt_in)  # (B, T, H)
        real = (batch.tgt_out != PAD_ID).flatten()  # (B * T,)
        positions = torch.nonzero_static(real, size=batch.num_target_tokens).squeeze(1)  # (N,)
        hidden = outputs.flatten(0, 1).index_select(0, positions)  # (N, H)
        return self.model.logits(hidden), batch.tgt_out.flatten().index_select(0, positions)

    def token_nll(self, batch: Batch) -> Tensor:
        """The negative log-likelihood of each real target token, (N,) in fp32."""
        scores, targets = self.target_logits(batch)
        return smoothed_cross_entropy(scores, targets, 0.0)[1]

    def smoothed_losses(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The label-smoothed training loss of each real target token and its NLL (for perplexity, no
        gradient): two (N,) fp32 tensors, from one fused cross-entropy (see :mod:`seq2seq.model.loss`)."""
        scores, targets = self.target_logits(batch)
        return smoothed_cross_entropy(scores, targets, self.hparams.label_smoothing)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Copy the padded ids to ``device`` without waiting (the loader pins them on a GPU); the lengths
        and indices stay on the CPU, where packing and the validation bookkeeping read them."""
        if not isinstance(batch, Batch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        moved = {
            name: getattr(batch, name).to(device, non_blocking=True) for name in ("src", "tgt_in", "tgt_out")
        }
        return replace(batch, **moved)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """The loss to back-propagate: its gradient, once accumulated over the micro-batches of an optimizer
        step and averaged by DDP, is that of the mean loss over all their target tokens.

        Nothing here waits for the device except on logging steps: token counts come from the collate
        step, the sums are all-reduced asynchronously, and a non-finite loss is noted on the device (the
        optimizer step skips it there; the policy is applied when it is next read, see
        :meth:`_apply_nonfinite_policy`).
        """
        losses, nll = self.smoothed_losses(batch)
        # [loss sum, NLL sum, target tokens] over all processes: their batches hold different token counts.
        totals = torch.stack([losses.detach().sum(), nll.sum(), losses.new_full((), batch.num_target_tokens)])
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(totals)  # Lightning's reduce adds a barrier, which waits on the GPU
        loss_sum, nll_sum, tokens = totals.unbind()
        self._note_loss(loss_sum)
        if self._window is None:  # the first micro-batch of an optimizer step fixes the loss's scale
            self._window = [tokens, tokens, 1]
        else:
            self._window[1] = self._window[1] + tokens
            self._window[2] += 1
        if should_update_logs(self.trainer):
            self._log_training_step(loss_sum / tokens, nll_sum / tokens, batch.src.size(0))
        # Lightning divides by accumulate_grad_batches and DDP averages over processes: undone here, so
        # the gradient is the token sum over the first micro-batch's tokens (rescaled before the step).
        return (
            losses.sum() * (self.trainer.world_size * self.trainer.accumulate_grad_batches) / self._window[0]
        )

    def _log_training_step(self, loss: Tensor, nll: Tensor, sentences: int) -> None:
        """Log the step's loss, perplexity and skipped steps so far, and apply the non-finite policy.

        The values are read from the device in one wait and logged as numbers, off the progress bar:
        Lightning keeps what is logged until the epoch ends and reads a progress-bar value again after
        every later batch (a device tensor, or the one it makes of a number: a wait each step).
        :class:`~seq2seq.progress.ProgressLog` puts the loss on the bar.
        """
        loss, ppl, skipped = torch.stack([loss, nll.exp(), self._skipped + self._found_inf]).tolist()
        self.log("train_loss", loss, batch_size=sentences)
        self.log("train_ppl", ppl, batch_size=sentences)
        self.log("train_skipped_steps", skipped, reduce_fx="max")
        self._apply_nonfinite_policy(int(skipped))

    def _note_loss(self, loss_sum: Tensor) -> None:
        """Record on the device whether ``loss_sum`` (the same on every process) is finite."""
        if self._found_inf is None:
            self._found_inf = loss_sum.new_zeros((), dtype=torch.float32)
            self._skipped = torch.zeros_like(self._found_inf)
            self._first_nonfinite = loss_sum.new_full((2,), -1.0, dtype=torch.float32)  # (step, loss)
        bad = ~torch.isfinite(loss_sum)
        self._found_inf = torch.maximum(self._found_inf, bad.float())
        first = bad & (self._first_nonfinite[0] < 0)
        step = torch.stack([loss_sum.new_full((), self.global_step, dtype=torch.float32), loss_sum.float()])
        self._first_nonfinite = torch.where(first, step, self._first_nonfinite)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm, tokens, batches = self._window
        if batches > 1:  # accumulated: from "over the first micro-batch's tokens" to "over all tokens"
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, norm / tokens)
        # Fused AdamW skips its update on the device when found_inf is non-zero: no update, no moment
        # change, no step count, on every process (the loss was summed over all of them). Under
        # 16-mixed the grad scaler sets its own found_inf, which a non-finite loss also sets.
        optimizer.found_inf = self._found_inf

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed's GradScaler
            clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm, scaler)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._skipped = self._skipped + self._found_inf
        self._found_inf = torch.zeros_like(self._found_inf)
        self._window = None

    def on_train_end(self) -> None:
        if self._found_inf is not None:
            self._apply_nonfinite_policy(int(self._skipped + self._found_inf))

    def _apply_nonfinite_policy(self, skipped: int) -> None:
        """Act on the non-finite record, ``skipped`` steps so far (read from the device: a wait, on logging
        steps and at the end only)."""
        if skipped == self._skipped_reported:
            return
        step, value = self._first_nonfinite.tolist()
        where = f"at step {int(step)}"
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(
                f"Non-finite training loss ({value}) {where}; the weights were not updated from it;"
                " module.nonfinite_loss=skip skips such steps"
            )
        log.warning(
            "Skipped %d step(s) with a non-finite training loss so far; the first: (%s) %s",
            skipped,
            value,
            where,
        )
        self._skipped_reported = skipped

    def on_validation_epoch_start(self) -> None:
        self._val_sentences = {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        nll = self.token_nll(batch)
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
        """Log the validation loss, BLEU and chrF. For a mixture of corpora, BLEU and chrF are the means
        over the corpora, each also logged per corpus (``val_bleu/<name>``, ``val_chrf/<name>``)."""
        sentences = gather_dicts(self._val_sentences)
        datamodule = self.trainer.datamodule
        references = datamodule.text("valid").tgt
        indices = sorted(sentences)
        hypotheses = [sentences[i][0] for i in indices]
        kept_references = [references[i] for i in indices]
        val_loss = sum(sentences[i][1] for i in indices) / max(sum(sentences[i][2] for i in indices), 1)
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        mixture = datamodule.mixture_split("valid")
        if mixture is None:
            scores = corpus_scores(hypotheses, kept_references, self.tgt_lang, self.bleu_tokenize)
            metrics.update(val_bleu=scores.bleu, val_chrf=scores.chrf)
        else:
            corpus_ids, corpora = mixture
            ids = [corpus_ids[i] for i in indices]
            by_corpus = scores_by_corpus(hypotheses, kept_references, ids, corpora, self.bleu_tokenize)
            metrics["val_bleu"], metrics["val_chrf"] = mean_over_corpora(by_corpus)
            for name, scores in by_corpus.items():
                metrics.update({f"val_bleu/{name}": scores.bleu, f"val_chrf/{name}": scores.chrf})
        # Every process computed the same values from the gathered sentences: nothing to reduce.
        self.log_dict(
            {name: metrics[name] for name in ("val_loss", "val_ppl", "val_bleu", "val_chrf")}, prog_bar=True
        )
        self.log_dict({name: value for name, value in metrics.items() if "/" in name})
        scheduler = self.lr_schedulers()
        if (
            isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            and not self.trainer.sanity_checking
        ):
            scheduler.step(metrics["val_bleu"])

    def configure_optimizers(self) -> dict[str, Any]:
        # Fused: it takes the non-finite flag as found_inf and skips on the device (see training_step).
        optimizer = torch.optim.AdamW(self.parameters(), fused=True, **self.hparams.optimizer)
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
        # The budget-aware schedules read the trainer's budget; the others need no trainer.
        trainer = self.trainer if settings["name"] in BUDGET_SCHEDULES else None
        scheduler = build_scheduler(settings, optimizer, trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.weight_average] if self.weight_average is not None else []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is None:
            raise RuntimeError("TranslationModule.tokenizer must be set before saving a checkpoint")
        if self.weight_average is not None:
            # Here, not in the callback: Lightning calls callbacks' hook for full checkpoints only.
            self.weight_average.fill_checkpoint(checkpoint)
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
