"""Configuration errors, and the command-line wrapper that reports them in one line.

A ``ConfigError`` means the settings (or the data they point at) cannot give a valid run: the
message names the field and says how to fix it. It subclasses ``ValueError``, so code that
catches ``ValueError`` keeps working. Commands report it as one line on stderr,
``<command>: error: <message>``, write it (with its traceback) to the run's log file, and exit
with ``EXIT_CONFIG`` (2, the usual exit status of a usage error), without a traceback on the
terminal. ``JEI_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) re-raises it instead.

Every Hydra command uses the same two pieces::

    @hydra.main(config_path="pkg://jei.configs", config_name="compare", version_base="1.3")
    @cli_main("jei-compare")
    def compare_main(cfg): ...

    def compare(cfg):
        with config_errors():        # an error while building objects is the config's fault
            ...build and check everything...
        ...the actual work...
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from omegaconf.errors import OmegaConfBaseException

EXIT_CONFIG = 2
DEBUG_ENV = "JEI_DEBUG"

F = TypeVar("F", bound=Callable[..., Any])

# What building objects from a config raises when the config is wrong: the components' own
# checks (ValueError, TypeError for an argument a factory does not take), unknown registry
# names (LookupError), missing optional packages (ImportError), missing files, and OmegaConf's
# errors (a missing key, an interpolation that does not resolve).
BUILD_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,
    ImportError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    OmegaConfBaseException,
)


class ConfigError(ValueError):
    """A setting (or input data) that cannot give a valid run.

    ``field`` is the dotted setting the message starts with (``trainer.exits.batch_size``), or
    None. ``rebase`` renames it, for settings objects that are built under more than one node
    (the optimizer of ``trainer.backbone`` and of ``trainer.exits``).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def rebase(self, old: str, new: str) -> ConfigError:
        """This error with its field ``old[.rest]`` renamed ``new[.rest]`` (itself if not under ``old``)."""
        if self.field is None or not (self.field == old or self.field.startswith(old + ".")):
            return self
        field = new + self.field[len(old):]
        message = self.message
        if message.startswith(self.field):
            message = field + message[len(self.field):]
        return ConfigError(message, field)


def debug_enabled() -> bool:
    """Whether tracebacks were asked for: ``JEI_DEBUG`` set (not 0/false) or ``HYDRA_FULL_ERROR=1``."""
    flag = os.environ.get(DEBUG_ENV, "").strip().lower()
    return flag not in ("", "0", "false", "no") or os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def config_errors(types: tuple[type[BaseException], ...] = BUILD_ERRORS) -> Iterator[None]:
    """Turn the ``types`` raised inside the block into ``ConfigError`` (same message, chained).

    For the validation phase of a command, where every such error is the settings' fault;
    leave the real work outside the block, so its errors keep their traceback.
    """
    try:
        yield
    except ConfigError:
        raise
    except types as err:
        message = str(err)
        if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
            message = err.args[0]  # KeyError's str() quotes its message
        raise ConfigError(message or type(err).__name__) from err


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report(command: str, err: BaseException) -> None:
    """``<command>: error: <message>`` on stderr, and the message with its traceback in the log files."""
    line = one_line(str(err))
    sys.stderr.write(f"{command}: error: {line}\n")
    sys.stderr.flush()
    _log_to_files(command, line, err)


def _log_to_files(command: str, line: str, err: BaseException) -> None:
    """Write to the file handlers only (Hydra's ``<run dir>/<job>.log``): the terminal has its line."""
    logger = logging.getLogger(command)
    record = logger.makeRecord(
        command, logging.ERROR, __file__, 0, "%s: error: %s", (command, line),
        (type(err), err, err.__traceback__),
    )
    seen: set[int] = set()
    for source in (logging.getLogger(), logging.getLogger("jei")):
        for handler in source.handlers:
            if isinstance(handler, logging.FileHandler) and id(handler) not in seen:
                seen.add(id(handler))
                if record.levelno >= handler.level:
                    handler.handle(record)
                    handler.flush()


def cli_main(command: str) -> Callable[[F], F]:
    """Decorator for a command's entry function: a ``ConfigError`` becomes one stderr line, a log
    entry and exit status 2 (see the module docstring); other errors pass through unchanged.

    Put it under ``@hydra.main`` so the run's log file is open when the error is reported.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ConfigError as err:
                if debug_enabled():
                    raise
                report(command, err)
                raise SystemExit(EXIT_CONFIG) from None

        return wrapper  # type: ignore[return-value]

    return decorate
