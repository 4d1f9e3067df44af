"""bench/many_to_en.py: its runs resume, it reads peak memory from /usr/bin/time's report, and it prepares
with a recipe's data keys."""

import pytest

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def many_to_en():
    return bench_script("many_to_en")


def test_a_run_is_timed_and_resumes_from_its_last_checkpoint(many_to_en, tmp_path):
    command = many_to_en.timed_train_command(tmp_path, 28.0, ["experiment=bible_many_to_en"])
    assert command[:5] == ["/usr/bin/time", "-v", "-a", "-o", str(tmp_path / "time.txt")]
    assert "trainer.max_time=00:00:28:00" in command and f"hydra.run.dir={tmp_path}" in command
    assert not any(arg.startswith("ckpt_path=") for arg in command)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    resumed = many_to_en.timed_train_command(tmp_path, 28.0, ["experiment=bible_many_to_en"])
    assert resumed[-1] == f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"


def test_peak_memory_is_read_from_the_time_report(many_to_en, tmp_path):
    report = tmp_path / "time.txt"
    report.write_text(
        "\tUser time (seconds): 1.0\n\tMaximum resident set size (kbytes): 3145728\n"
        "\tUser time (seconds): 2.0\n\tMaximum resident set size (kbytes): 1048576\n"  # resumed: appended
    )
    assert many_to_en.peak_memory_gib(report) == pytest.approx(3.0)


def test_a_recipes_data_keys_choose_the_prepared_cache_and_its_model_keys_do_not(many_to_en):
    """seq2seq.prepare has no model group: a recipe's model.* overrides would fail it."""
    recipe = ["model.attention=bahdanau", "data.subword.vocab_size=8000", "module.optimizer.lr=0.003"]
    assert many_to_en.data_overrides(recipe) == ["data.subword.vocab_size=8000"]
