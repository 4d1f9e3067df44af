"""The sweeper behind ``hydra/sweeper=seq2seq``: asynchronous workers on one Optuna study.

``run_sweep`` opens the study (a journal file in the sweep folder, or a database URL), enqueues the
fixed points (the baseline) once per study, and starts N workers: local processes (forked, each on its
own share of the CPU cores) or, with a submitit launcher configured (``hydra/launcher=slurm``), one
submitit job each. A worker takes the next trial as soon as its last one ended: it asks the study,
runs the training job in the trial's own folder (``<sweep dir>/<trial number>``) with the trial's
values as overrides, and tells the study how it ended. Training reports each validation to the trial
(seq2seq.pruning, through seq2seq.trial) and stops when the pruner says so. A worker that dies leaves
its trial failed (or queued again); running the same command again continues the study up to ``n_trials``.

The modules: ``space`` (the search space, fixed points), ``storage`` (the lock, dead workers' trials),
``workers`` (the worker loop), ``backends`` (local processes or submitit jobs), ``plots`` (the report),
``run`` (``run_sweep``, all of them together). None imports Optuna at module level.
"""

from seq2seq.sweeper.run import run_sweep

__all__ = ["run_sweep"]
