"""bench/recipe_ablation.py resumes a long queue: finished runs are skipped, unfinished ones continue from
their last.ckpt, and a setting's overrides reach train.py."""

import json

import pytest

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def ablation():
    return bench_script("recipe_ablation")


def test_a_new_run_trains_from_scratch_with_its_setting(ablation, tmp_path):
    command = ablation.training_command(tmp_path, "9-4", "linear", 28.0, ["model=tiny"])
    assert command[1] == "train.py"
    assert "data.corpus.src_version=9" in command and "data.corpus.tgt_version=4" in command
    assert "trainer.max_time=00:00:28:00" in command
    assert command.index("model=tiny") < command.index("module.scheduler.name=linear")
    assert not any(arg.startswith("ckpt_path=") for arg in command)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(ablation, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "result.json").write_text(json.dumps({"status": "interrupted"}))
    command = ablation.training_command(tmp_path, "e-k", "default", 1.5, [])
    assert command[-1] == f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"
    assert "trainer.max_time=00:00:01:30" in command
    assert not ablation.finished(tmp_path, "default")


def test_a_trained_run_is_not_trained_again_and_counts_as_finished_once_decoded(ablation, tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok"}))
    assert ablation.training_command(tmp_path, "e-k", "ema", 28.0, []) is None
    assert not ablation.finished(tmp_path, "ema")  # the greedy test translation is still to do
    (tmp_path / "greedy.test.hyp").write_text("a\n")
    assert ablation.finished(tmp_path, "ema")


def test_the_plain_loop_is_finished_by_its_result(ablation, tmp_path):
    command = ablation.training_command(tmp_path, "e-k", "plain_loop", 28.0, ["model=tiny"])
    assert command[1] == "bench/plain_loop.py" and "model=tiny" not in command
    assert not ablation.finished(tmp_path, "plain_loop")
    (tmp_path / "plain.json").write_text("{}")
    assert ablation.finished(tmp_path, "plain_loop")


def test_settings_combine_with_a_plus(ablation, tmp_path):
    command = ablation.training_command(tmp_path, "e-k", "unidirectional+lr_0.006", 28.0, [])
    assert "model.reverse_source=true" in command and "module.optimizer.lr=0.006" in command


def test_the_best_trial_of_a_sweep_is_a_setting_kept_for_resumes(ablation, tmp_path):
    optuna = pytest.importorskip("optuna")
    from omegaconf import OmegaConf

    from seq2seq.trial import JOURNAL_FILE, StudySpec

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    sweeper = {
        "study_name": "recipe", "storage": None, "direction": "maximize", "heartbeat_interval": None,
        "retry_killed": 0,
    }  # fmt: skip
    OmegaConf.save({"hydra": {"sweeper": sweeper}}, sweep / "multirun.yaml")
    spec = StudySpec(storage=str(sweep / JOURNAL_FILE), name="recipe", direction="maximize")
    study = spec.load()
    space = {"module.optimizer.lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)}
    for lr, bleu in ((0.002, 4.0), (0.005, 6.5), (0.008, 5.0)):
        study.enqueue_trial({"module.optimizer.lr": lr})
        study.tell(study.ask(space), bleu)
    out = tmp_path / "out"
    assert ablation.add_sweep_best(out, sweep) == ["module.optimizer.lr=0.005"]
    command = ablation.training_command(tmp_path / "run", "e-k", "sweep_best", 28.0, [])
    assert "module.optimizer.lr=0.005" in command
    # The study goes on (a better trial): a resumed queue keeps training what it started.
    study.enqueue_trial({"module.optimizer.lr": 0.003})
    study.tell(study.ask(space), 9.0)
    assert ablation.add_sweep_best(out, sweep) == ["module.optimizer.lr=0.005"]
    assert ablation.best_of_sweep(sweep) == ["module.optimizer.lr=0.003"]


def test_each_settings_subwords_are_prepared_before_the_timed_runs(ablation):
    ablation.SETTINGS["vocab_4k"] = ["data.subword.vocab_size=4000", "model.hidden_size=512"]
    try:
        choices = ablation.data_choices(["default", "vocab_4k", "plain_loop", "linear"], ["data.max_len=64"])
    finally:
        del ablation.SETTINGS["vocab_4k"]
    assert choices == [("data.max_len=64",), ("data.max_len=64", "data.subword.vocab_size=4000")]
