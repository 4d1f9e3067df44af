"""Run Joey NMT 2.3 (``python -m joeynmt``) with two fixes for this stack and an optional time budget.

- sentencepiece 0.2 has no ``SetVocabulary``, which Joey calls to restrict the model to its vocabulary
  file; ours lists every piece of the model (bench/joey/prepare.py), so the call would change nothing
  and a no-op stands in for it.
- ``--budget-minutes M`` (train mode) stops training M minutes after it starts, the way Ctrl-C does in
  Joey: it catches the interrupt and saves the current weights. Data loading is not counted, as
  Lightning's ``trainer.max_time`` does not count ours.

    python bench/joey/joey.py [--budget-minutes M] train|test|translate CONFIG [joeynmt options]
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
import time

import sentencepiece
from joeynmt.__main__ import main
from joeynmt.training import TrainManager


def stop_training_after(minutes: float) -> None:
    """Interrupt the main thread ``minutes`` after ``TrainManager.train_and_validate`` starts."""
    train_and_validate = TrainManager.train_and_validate

    def timed(self: TrainManager, *args: object, **kwargs: object) -> None:
        started = time.perf_counter()
        timer = threading.Timer(minutes * 60, _thread.interrupt_main)
        timer.start()
        try:
            train_and_validate(self, *args, **kwargs)
        finally:
            timer.cancel()
            print(f"joey.py: training ran {(time.perf_counter() - started) / 60:.2f} minutes", flush=True)

    TrainManager.train_and_validate = timed


if __name__ == "__main__":
    if not hasattr(sentencepiece.SentencePieceProcessor, "SetVocabulary"):
        sentencepiece.SentencePieceProcessor.SetVocabulary = lambda self, pieces: None
    # A background job starts with SIGINT ignored; Joey's stop-on-interrupt needs Python's handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if len(sys.argv) > 2 and sys.argv[1] == "--budget-minutes":
        stop_training_after(float(sys.argv[2]))
        del sys.argv[1:3]
    main()
