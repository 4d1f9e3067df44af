"""Lightning's ThroughputMonitor without its wait on the GPU at every training batch."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor


class ThroughputMonitor(LightningThroughputMonitor):
    """Lightning's callback, timing only the batches whose logs are written.

    Lightning synchronises CUDA after every batch so that its clock reads the GPU's progress, which
    stalls the host's queue each step. Here every batch is counted, but the clock is read (after that
    synchronisation) only on logging steps (``trainer.log_every_n_steps``), so each rate spans whole
    logging intervals: ``window_size`` of them.
    """

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        if trainer._logger_connector.should_update_logs:
            super()._update(trainer, pl_module, batch, iter_num)
            return
        stage = trainer.state.stage
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
