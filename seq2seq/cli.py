"""What the command-line entry points share: exit codes and one-line errors, and the quiet start.

Imports nothing heavy (no torch, no Lightning), so that ``--help`` and configuration mistakes answer in
about a second: the entry points import the package's training and translation code only once Hydra has
composed the configuration.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    GrammarParseError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    ValidationError,
)

from seq2seq.errors import UserError
from seq2seq.private_apis import config_root

# Exit codes: 2 for a user's mistake (like argparse), 128 + the signal for a stop by a signal (like the
# shell), and Python's 1 for a bug, with its traceback.
USAGE_ERROR = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# A user's mistake: what this toolkit raises where it finds one (seq2seq.errors.UserError), and Hydra's
# and OmegaConf's errors about the configuration itself (composing it, a mandatory value not given, an
# interpolation that names no key or does not parse, a value of the wrong type). Any other exception is
# a bug, reported with its traceback.
CONFIG_ERRORS = (
    HydraException,
    MissingMandatoryValue,
    InterpolationResolutionError,
    GrammarParseError,
    ValidationError,
)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a user's mistake rather than a bug (see CONFIG_ERRORS)."""
    if isinstance(error, InstantiationException):
        # A target named in the config failed: a user's mistake if it said so (UserError), or if Hydra
        # itself refused the config before the target's code ran: no such target (ImportError), or
        # arguments the target's signature rejects (TypeError: an unknown key is an unexpected keyword
        # argument). A TypeError raised inside the target is a bug.
        cause = error.__cause__
        if cause is None or isinstance(cause, UserError):
            return True
        return isinstance(cause, (TypeError, ImportError)) and raised_by_hydra(cause)
    return isinstance(error, (UserError, *CONFIG_ERRORS))


def raised_by_hydra(error: BaseException) -> bool:
    """Whether ``error`` was raised in Hydra's own code, not in code Hydra called: the innermost frame
    of its traceback is Hydra's (a TypeError raised by a call's argument binding has the caller's)."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame.f_globals.get("__name__", "").startswith("hydra.")


def unknown_option(key: str, known: Iterable[str]) -> str:
    """The message for an option ``key`` that is not one of ``known`` (dotted keys), with the closest one."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]}?" if close else f"python {Path(sys.argv[0]).name} --help lists them"
    return f"unknown option {key}; {hint}"


def dotted_keys(config: DictConfig) -> list[str]:
    """Every key of ``config``, nested ones as ``group.key``; interpolations are not resolved."""

    def walk(node: dict, prefix: str) -> Iterator[str]:
        for key, value in node.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")

    return list(walk(OmegaConf.to_container(config, resolve=False), ""))


def reject_added_keys(cfg: DictConfig) -> None:
    """For a command whose options are all in its config (translate.py): a key added on the command line
    with ``+key=value`` can only be a typo (Hydra would add it, and nothing would read it)."""
    added = [
        o[1:].partition("=")[0] for o in HydraConfig.get().overrides.task if o[:2] != "++" and o[:1] == "+"
    ]
    if added:
        raise UserError(unknown_option(added[0], [key for key in dotted_keys(cfg) if key not in added]))


def config_groups() -> str:
    """The config groups and their options, a line each, for ``python train.py --help`` (``${config_groups:}``
    in conf/hydra/help/train.yaml). Hydra's own list (``$APP_CONFIG_GROUPS``) also shows the configs
    named ``_...``, which options build on (``data/_shared``) but which are no choice of their own."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    loader = GlobalHydra.instance().config_loader()

    def groups(parent: str) -> Iterator[str]:
        for name in loader.list_groups(parent):
            group = f"{parent}/{name}" if parent else name
            if group == "hydra":  # Hydra's own groups: python train.py --hydra-help
                continue
            options = [o for o in loader.get_group_options(group, ObjectType.CONFIG) if not o.startswith("_")]
            if options:
                yield f"{group}: {', '.join(sorted(options))}"
            yield from groups(group)

    return "\n".join(sorted(groups("")))


OmegaConf.register_new_resolver("config_groups", config_groups, replace=True)


def one_line(error: BaseException) -> str:
    """The error's message on one line (Hydra's messages span several); an unknown key gets the closest
    known one."""
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    cause = error.__cause__
    if str(error).startswith("Could not override") and isinstance(
        getattr(cause, "parent_node", None), DictConfig
    ):
        root = config_root(cause.parent_node)  # key=value for a key the config does not have
        return unknown_option(cause.full_key, [k for k in dotted_keys(root) if not k.startswith("hydra")])
    message = str(error).strip() or type(error).__name__
    if isinstance(error, MissingMandatoryValue):  # its later lines repeat the key and the node's type
        return f"{message.splitlines()[0]} (give it on the command line: key=value)"
    message = message.split("\nConfig search path")[0]  # Hydra's missing config option: its search path
    return re.sub(r"\s*\n\s*", " ", message)


def debugging() -> bool:
    """``HYDRA_FULL_ERROR=1`` (Hydra's switch) or ``SEQ2SEQ_DEBUG=1``: show tracebacks of user errors too."""
    return os.environ.get("SEQ2SEQ_DEBUG") == "1"


def command(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Decorates the function under ``@hydra.main`` so that a single run ends as :func:`exit_status`
    says, without Hydra's "Error executing job" line. In a multirun, a trial's exception goes to the
    sweeper, which records the trial as failed and runs the others."""

    @functools.wraps(task)
    def run_task(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except BaseException as error:
            if not (isinstance(error, Exception) and HydraConfig.get().mode == RunMode.MULTIRUN):
                exit_for(error)
            raise

    return run_task


def run_cli(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function as a command; errors before the job (composing the config) and
    after a multirun end as :func:`exit_for` says."""
    # Hydra prints the errors it catches itself (with part of the traceback) and exits 1; with
    # HYDRA_FULL_ERROR=1 it raises them instead, and we decide. The user's own setting is kept in
    # SEQ2SEQ_DEBUG, which the processes Lightning launches for DDP inherit.
    os.environ.setdefault("SEQ2SEQ_DEBUG", "1" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except BaseException as error:
        exit_for(error)
        raise


def exit_for(error: BaseException) -> None:
    """Exit as a command should for ``error``, or return for the caller to raise it (a bug, or any
    error while debugging: its traceback is printed once).

    A user's mistake prints one line ``error: ...`` on stderr and exits 2; SIGTERM exits 143 and
    Ctrl-C 130 (a training run has saved ``last.ckpt`` and said so).
    """
    if isinstance(error, SystemExit):
        # Lightning raises SIGTERMException (a SystemExit with no code, so exit 0) on SIGTERM, and
        # exits 1 after handling Ctrl-C: schedulers must see a stopped run, not a success.
        if type(error).__name__ == "SIGTERMException":
            sys.exit(EXIT_SIGTERM)
        if isinstance(error.__context__, KeyboardInterrupt):
            sys.exit(EXIT_SIGINT)
    elif isinstance(error, BrokenPipeError):  # stdout closed early (| head): nothing left to say
        sys.exit(1)
    elif isinstance(error, KeyboardInterrupt):  # Ctrl-C outside training (reading data, translating)
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
    elif isinstance(error, Exception) and is_user_error(error) and not debugging():
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def log_to_files(level: int, message: str, exc_info: bool = False) -> None:
    """Write a record to the log files only (train.log), not the console: the console gets the error
    once, from :func:`run_cli`."""
    record = logging.getLogger("seq2seq").makeRecord(
        "seq2seq", level, "", 0, message, None, sys.exc_info() if exc_info else None
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _DropMessages(logging.Filter):
    """Drops the log records whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party() -> None:
    """Silence what third-party libraries print that tells our users nothing they can act on.

    The one place for such filters: each says why. Our own warnings, and the libraries' other
    warnings, still show.
    """
    # Lightning calls a torch pytree API that torch has deprecated; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning warns when an epoch has fewer batches than trainer.log_every_n_steps; metrics are
    # still logged at the end of the epoch, and seq2seq.progress.ProgressLog reports progress anyway.
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval")
    # torch warns that weights_only=False can run code from the file: our checkpoints hold the
    # tokenizer object and are loaded only from the user's own runs.
    warnings.filterwarnings("ignore", message=r".*weights_only=False")
    # Lightning gives its logger a stderr handler of its own; under Hydra's logging its messages reach
    # the console and train.log already, so they would show twice.
    if logging.getLogger().hasHandlers():
        lightning = logging.getLogger("lightning")
        for handler in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(handler)
    # Lightning says it loads a checkpoint the way it always does.
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").addFilter(
        _DropMessages("`weights_only` was not set")
    )
    # Lightning advertises its cloud services (litlogger, litmodels) at every start.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    # ...and announces Ctrl-C and SIGTERM, which seq2seq.callbacks.InterruptionCheckpoint reports in
    # one line with the step and the checkpoint saved.
    rank_zero.addFilter(_DropMessages("💡 Tip", "Detected KeyboardInterrupt"))
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(
        _DropMessages("Received SIGTERM", "Bypassing SIGTERM")
    )
