"""The private names of Lightning, Hydra and OmegaConf this package relies on still exist and do what
they did (see seq2seq/private_apis.py, and the ThroughputMonitor subclass in seq2seq/callbacks.py)."""

from __future__ import annotations

import inspect
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import RunningStage
from omegaconf import OmegaConf

from seq2seq import private_apis
from seq2seq.callbacks import ThroughputMonitor as OurThroughputMonitor
from seq2seq.data.collate import batch_size, target_tokens
from tests.test_training_step import fit_tiny_module, random_split


def test_the_logger_connector_still_decides_which_steps_log():
    assert isinstance(inspect.getattr_static(_LoggerConnector, "should_update_logs"), property)
    trainer = L.Trainer(accelerator="cpu", logger=False, log_every_n_steps=3, enable_progress_bar=False)
    trainer.training = True  # the fit loop is the active loop, as inside fit
    decisions = []
    for batches in range(6):
        trainer.fit_loop.epoch_loop._batches_that_stepped = batches
        decisions.append(private_apis.should_update_logs(trainer))
    assert decisions == [False, False, True, False, False, True]  # every third, counted from 1


def test_the_epoch_loop_still_has_what_restart_finished_epoch_resets():
    assert callable(_TrainingEpochLoop._num_ready_batches_reached)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    loop = trainer.fit_loop.epoch_loop
    for tracker in (
        loop.batch_progress,
        loop.scheduler_progress,
        loop.automatic_optimization.optim_progress,
    ):
        assert callable(tracker.reset_on_run)
    assert callable(loop.val_loop.batch_progress.total.reset)
    assert private_apis.batches_done_in_epoch(trainer) == 0
    loop.batch_progress.increment_processed()
    assert private_apis.batches_done_in_epoch(trainer) == 1


def test_the_epoch_loop_still_ends_an_epoch_when_the_count_resume_at_batch_of_epoch_sets_is_reached():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit_loop.max_batches = 10  # the new ranks' batches per epoch: trainer.num_training_batches
    progress = trainer.fit_loop.epoch_loop.batch_progress
    progress.increment_by(6)  # six batches saved on batch end: processed, not yet completed
    progress.current.completed = progress.total.completed = 5
    private_apis.resume_at_batch_of_epoch(trainer, 8)
    assert (progress.current.processed, progress.current.completed, progress.total.processed) == (8, 7, 6)
    progress.increment_completed()  # what Lightning's restart does with a batch saved on its end
    progress.reset_on_restart()
    assert progress.current.ready == 8 and not trainer.fit_loop.epoch_loop._num_ready_batches_reached()
    progress.increment_by(2)
    assert trainer.fit_loop.epoch_loop._num_ready_batches_reached()


def test_lightnings_throughput_monitor_still_counts_what_our_override_counts_between_logging_steps():
    """Our ThroughputMonitor calls Lightning's ``_update`` on logging steps only and counts the other
    batches into its private counters itself: after a fit, both must have counted the same batches,
    samples and target tokens, and Lightning's must have counted them in ``_update``."""
    counted_in_update = []

    class LightningsMonitor(ThroughputMonitor):
        def _update(self, trainer, pl_module, batch, iter_num):
            before = self._batches[trainer.state.stage]
            super()._update(trainer, pl_module, batch, iter_num)
            counted_in_update.append(self._batches[trainer.state.stage] - before)

    batches = [random_split(seed).collate(list(range(8))) for seed in range(7)]
    ours = OurThroughputMonitor(batch_size_fn=batch_size, length_fn=target_tokens, window_size=2)
    lightnings = LightningsMonitor(batch_size_fn=batch_size, length_fn=target_tokens, window_size=2)
    fit_tiny_module(batches, max_steps=7, log_every_n_steps=3, callbacks=[ours, lightnings])
    assert counted_in_update == [1] * 7  # Lightning's _update counts each batch it is given
    stage = RunningStage.TRAINING
    assert ours._batches[stage] == lightnings._batches[stage] == 7
    assert ours._samples[stage] == lightnings._samples[stage] == 7 * 8
    assert ours._lengths[stage] == lightnings._lengths[stage] == sum(target_tokens(b) for b in batches)


def test_omegaconf_nodes_still_reach_their_root_through_get_root():
    config = OmegaConf.create({"model": {"encoder": {"hidden_size": 8}}, "trainer": {"max_steps": 3}})
    assert private_apis.config_root(config.model) is config
    assert private_apis.config_root(config.model.encoder) is config


def test_the_sigterm_broadcast_and_handler_are_still_what_check_sigterm_on_logging_steps_replaces():
    # The epoch loop calls the broadcast and each batch's advance through its instance, and the handler
    # list is built from the connector instance's notifier when fit registers the handlers.
    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(_TrainingEpochLoop.advance)
    assert "self.advance(data_fetcher)" in inspect.getsource(_TrainingEpochLoop.run)
    assert "self._sigterm_notifier_fn" in inspect.getsource(_SignalConnector.register_signal_handlers)

    class Requeue:  # what seq2seq.slurm.SlurmRequeue gives it: the handler's note, the save it asks for
        def __init__(self) -> None:
            self.requested = False
            self.saved_at: list[int] = []

        def save_and_requeue(self) -> None:
            self.requested = False
            self.saved_at.append(trainer.global_step)

    class NoteAtStep(L.Callback):  # the requeue signal, as if it came during the batch of step 2
        def on_train_batch_end(self, trainer, pl_module, *args):
            requeue.requested = requeue.requested or trainer.global_step == 2

    requeue = Requeue()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, max_steps=5, callbacks=[NoteAtStep()],
    )  # fmt: skip
    private_apis.check_sigterm_on_logging_steps(trainer, requeue)
    assert trainer._signal_connector.received_sigterm is False
    assert trainer.fit_loop.epoch_loop.advance.__name__ == "agree_then_advance"
    trainer.fit(BoringModel())
    assert requeue.saved_at == [2]  # one process: at the start of the next batch, none under way
    trainer._signal_connector._sigterm_notifier_fn(signal.SIGTERM, None)  # one process: stops at once
    assert trainer.received_sigterm


def test_the_epoch_loop_still_asks_the_clock_that_agree_on_timed_validation_answers_for():
    # The epoch loop asks its instance's decision after each batch, and the decision compares the clock
    # with the trainer's last validation time, which a duration interval sets.
    assert "self._should_check_val_fx(data_fetcher)" in inspect.getsource(_TrainingEpochLoop)
    decide = inspect.getsource(_TrainingEpochLoop._should_check_val_fx)
    assert "self.trainer._val_check_time_interval" in decide
    assert "now - self.trainer._last_val_time >= interval" in decide
    trainer = L.Trainer(accelerator="cpu", logger=False, val_check_interval="00:00:00:05")
    assert trainer._val_check_time_interval == 5
    private_apis.agree_on_timed_validation(trainer)
    assert trainer.fit_loop.epoch_loop._should_check_val_fx.__name__ == "agreed"


def test_trainer_save_checkpoint_still_ends_in_a_barrier_that_save_checkpoint_alone_leaves_out(tmp_path):
    assert "barrier" in inspect.getsource(L.Trainer.save_checkpoint)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, max_steps=3,
    )  # fmt: skip
    trainer.fit(BoringModel())
    private_apis.save_checkpoint_alone(trainer, tmp_path / "alone.ckpt")
    checkpoint = torch.load(tmp_path / "alone.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint["optimizer_states"] and checkpoint["loops"]


def test_a_failed_hydra_job_still_keeps_its_exception_where_failed_job_error_reads_it():
    import pytest
    from hydra.core.utils import JobReturn, JobStatus

    error = ValueError("model.hidden_size must be positive")
    result = JobReturn(status=JobStatus.FAILED)
    result.return_value = error  # as run_job records a job that raised
    assert private_apis.failed_job_error(result) is error
    with pytest.raises(ValueError):  # the public property raises it: hence the private field
        _ = result.return_value


def test_optuna_still_keeps_a_studys_storage_and_a_trials_id_where_we_read_them():
    import optuna

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    assert private_apis.study_storage(study) is storage
    frozen = study.get_trials(deepcopy=False)[0]
    assert private_apis.trial_id(trial) == private_apis.trial_id(frozen)
    storage.set_trial_user_attr(private_apis.trial_id(frozen), "worker", "w1")  # what the sweeper writes
    assert study.get_trials()[0].user_attrs == {"worker": "w1"}


def test_a_model_checkpoints_saved_state_still_has_the_keys_we_rewrite_and_lightning_restores_them(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    saved = ModelCheckpoint(dirpath=tmp_path / "old", monitor="val_bleu", mode="max")
    saved.best_model_path, saved.best_model_score = str(tmp_path / "old" / "best.ckpt"), torch.tensor(7.5)
    state = saved.state_dict()
    assert private_apis.saved_best_checkpoint(state) == (str(tmp_path / "old"), saved.best_model_path, 7.5)
    assert {"kth_best_model_path", "kth_value", "best_k_models", "last_model_path"} <= state.keys()
    copy = str(tmp_path / "new" / "best.ckpt")
    private_apis.move_checkpoint_state(state, str(tmp_path / "new"), copy, state["best_model_score"])
    resumed = ModelCheckpoint(dirpath=tmp_path / "new", monitor="val_bleu", mode="max")
    resumed.load_state_dict(state)  # Lightning restores all of it: the folder is the callback's
    assert resumed.best_model_path == copy and float(resumed.best_model_score) == 7.5
    assert resumed.best_k_models == {copy: state["best_model_score"]} and resumed.kth_best_model_path == copy
