"""The search space of a sweep: Optuna distributions from Hydra's sweep overrides (``hydra.sweeper.params``
and the command line), a trial's values as overrides, and the fixed points enqueued before any search."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from omegaconf import DictConfig, OmegaConf

from seq2seq.errors import UserError

if TYPE_CHECKING:
    import optuna

# A study attribute: its fixed points are enqueued (once per study, whichever command continues it).
FIXED_POINTS_DONE = "fixed_points_enqueued"


def distribution(override: Override) -> Any:
    """An Optuna distribution for a sweep override: ``choice(a, b)``, ``range(start, stop[, step])``
    (stop excluded, as in Hydra's grid sweeps), ``interval(low, high)`` and ``tag(log, interval(...))``."""
    import optuna.distributions as d

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return d.CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            steps = int((value.stop - value.start) / value.step - 1e-9)
            return d.FloatDistribution(value.start, value.start + steps * value.step, step=value.step)
        last = value.start + (value.stop - 1 - value.start) // value.step * value.step
        return d.IntDistribution(int(value.start), int(last), step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(value.start, value.end, log=log_scale)
    raise UserError(f"hydra.sweeper.params: {override.input_line} is not a choice, range or interval")


def search_space(params: Mapping[str, Any], arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions of ``hydra.sweeper.params`` and of the command line's sweep overrides, and the
    command line's other overrides, passed to every trial as they are. The command line wins: a sweep
    override replaces the key's distribution, one value takes the key out of the search."""
    parser = OverridesParser.create()
    space, fixed = {}, []
    declared = [f"{key}={value}" for key, value in params.items()]
    for line in declared + list(arguments):
        override = parser.parse_override(line)
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        elif line not in declared:
            fixed.append(line)
            space.pop(override.get_key_element(), None)
        else:
            raise UserError(f"hydra.sweeper.params: {line} is one value, not a choice, range or interval")
    return space, fixed


def override_value(value: Any) -> str:
    """A trial's value as Hydra reads it on the command line."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str) and not re.fullmatch(r"[\w./:+-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def trial_overrides(fixed: list[str], params: Mapping[str, Any]) -> list[str]:
    return [*fixed, *(f"{key}={override_value(value)}" for key, value in params.items())]


def in_space(dist: Any, value: Any) -> bool:
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, int | float) and not isinstance(value, bool) and dist.low <= value <= dist.high


def enqueue_fixed_points(
    study: optuna.Study, points: list[Any], space: dict[str, Any], config: DictConfig
) -> None:
    """Enqueue each fixed point once per study: its values for the swept keys it names, the composed
    config's values for the others (``{}``: the config as it is, the baseline every search should show)."""
    if study.user_attrs.get(FIXED_POINTS_DONE):
        return
    for index, point in enumerate(points):
        params = {}
        for key, dist in space.items():
            if key in point:
                value = point[key]
            elif key in config.hydra.runtime.choices:  # a config group, as experiment=...
                value = config.hydra.runtime.choices[key]
            else:
                value = OmegaConf.select(config, key, default=None)
            if not in_space(dist, value):
                raise UserError(
                    f"hydra.sweeper.fixed_points[{index}]: {key}={value} is outside the search space"
                    f" ({dist}); give it a value in the space, or fixed_points=[]"
                )
            params[key] = value
        study.enqueue_trial(params, user_attrs={"fixed_point": index})
    study.set_user_attr(FIXED_POINTS_DONE, True)
