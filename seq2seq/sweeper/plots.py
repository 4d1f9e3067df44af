"""The sweep's report: the study's trials and best trial in the log, and its plots in the sweep folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from seq2seq.sweeper.space import trial_overrides

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def report(study: optuna.Study, sweep_dir: Path, plots: bool, step_unit: str = "steps") -> None:
    """Log the best trial; write the study's plots into the sweep folder (``step_unit``: what the
    trials' reports count, steps or seconds of training)."""
    states = [t.state.name for t in study.trials]
    counts = ", ".join(
        f"{states.count(s)} {s.lower()}"
        for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
        if s in states
    )
    log.info("Study %s: %s", study.study_name, counts or "no trials")
    if "COMPLETE" in states:
        best = study.best_trial
        log.info(
            "Best: trial %d, %g, %s", best.number, best.value, " ".join(trial_overrides([], best.params))
        )
    if plots:
        write_plots(study, sweep_dir, step_unit)


PLOTS = ("optimization_history", "intermediate_values", "param_importances")


LEGEND_ROWS = 15  # Optuna's PNG legends have a row per trial: more go in columns


def write_plots(study: optuna.Study, sweep_dir: Path, step_unit: str = "steps") -> None:
    """``<plot>.html`` (plotly, interactive) and ``<plot>.png`` (matplotlib) for each of PLOTS; a plot
    the study cannot make yet (too few trials) or a missing plotting library is a warning. The
    intermediate values' x axis says ``step_unit`` (Optuna calls every report's position a step)."""
    import warnings

    import optuna.visualization as plotly_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name in PLOTS:
            try:
                interactive = getattr(plotly_plots, f"plot_{name}")(study)
                if name == "intermediate_values":
                    interactive.update_xaxes(title_text=f"{step_unit} of training")
                interactive.write_html(sweep_dir / f"{name}.html")
            except (ImportError, ValueError, RuntimeError) as error:
                log.warning("No %s.html: %s", name, error)
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
                import optuna.visualization.matplotlib as matplotlib_plots

                axes = getattr(matplotlib_plots, f"plot_{name}")(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                if name == "intermediate_values":
                    axes.set_xlabel(f"{step_unit} of training")
                    handles, labels = axes.get_legend_handles_labels()
                    if len(labels) > LEGEND_ROWS:  # else dozens of trials set the figure's height
                        columns = -(-len(labels) // LEGEND_ROWS)
                        axes.legend(
                            handles, labels, bbox_to_anchor=(1.02, 1.0), loc="upper left", ncol=columns
                        )
                        figure.set_size_inches(11, 5)
                figure.savefig(sweep_dir / f"{name}.png", dpi=120, bbox_inches="tight")
                plt.close(figure)
            except (ImportError, ValueError, RuntimeError) as error:
                log.warning("No %s.png: %s", name, error)
