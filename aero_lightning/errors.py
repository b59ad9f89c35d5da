"""Errors that are the user's to fix, and how the command-line entry points report them.

A :class:`UserError` says what the user asked for that cannot be done: a path that does not exist, a name that is
not registered, a value out of range. Every entry point (``train.py``, ``eval.py``, ``transcribe.py``,
``python -m aero_lightning.data.prepare``, ``python -m aero_lightning.hf.export``) prints its message as one line,
``error: <message>``, on stderr and exits with status :data:`USER_ERROR_EXIT` (2), without a traceback. Anything
else is a bug or an environment failure and keeps its traceback.

The subclasses also derive from the built-in exception a library caller would expect (``FileNotFoundError``,
``ValueError``, ``KeyError``), so code that catches those keeps working.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "USER_ERROR_EXIT",
    "UnknownNameError",
    "UserError",
    "UserFileNotFoundError",
    "UserValueError",
    "check_group_overrides",
    "exit_on_user_error",
    "report_user_error",
]

USER_ERROR_EXIT = 2
"""Exit status of an entry point that stopped on a :class:`UserError` (the status argparse uses for bad usage)."""

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what and how to fix it."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (a checkpoint, an audio file, a data folder) does not exist."""


class UserValueError(UserError, ValueError):
    """A value the user gave is invalid (an empty data folder, a bad argument)."""


class UnknownNameError(UserError, KeyError):
    """A name that is not registered (a benchmark, a corpus). ``str()`` is the message itself, not its repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def report_user_error(err: BaseException) -> None:
    """Print ``error: <message>`` as one line on stderr."""
    sys.stderr.write(f"error: {_one_line(str(err))}\n")
    sys.stderr.flush()


def _missing_key_message(err: Exception) -> str:
    """The message for an omegaconf ``MissingMandatoryValue`` (a ``???`` key that was not given)."""
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    if key:
        return f"{key}= is required (e.g. {key}=PATH); see --help"
    return f"a required option was not given ({_one_line(str(err))}); see --help"


def exit_on_user_error(func: F) -> F:
    """Wrap an entry point so that a :class:`UserError`, a ``FileNotFoundError`` (a path the user or the config
    named) or a required ``???`` option left out exits with status 2.

    The wrapped function runs unchanged; on one of those errors the message is printed by
    :func:`report_user_error` and ``SystemExit(2)`` is raised. Hydra's ``@hydra.main`` reports any
    ``Exception`` with a traceback, but lets ``SystemExit`` through, so this goes *inside* ``@hydra.main``.

    Raises:
        SystemExit: status :data:`USER_ERROR_EXIT` on a user error.
    """
    from omegaconf.errors import MissingMandatoryValue

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        # a missing file is the user's to fix, wherever the entry point finds it missing
        except (UserError, FileNotFoundError) as err:
            report_user_error(err)
        except MissingMandatoryValue as err:
            sys.stderr.write(f"error: {_missing_key_message(err)}\n")
        raise SystemExit(USER_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]


def _group_values(override) -> list[str]:
    """The option names an override of a config group selects (one, a list, or a sweep's choices)."""
    if override.is_sweep_override():
        values: Iterable[Any] = list(override.sweep_string_iterator())
    else:
        value = override.value()
        values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values if v is not None]


def check_group_overrides(conf_dir: str | Path, argv: Sequence[str] | None = None) -> None:
    """Exit with one line if a command-line override picks an option a config group does not have.

    Hydra reports ``benchmark=nosuch`` with its whole search path and status 1; this checks each ``group=name``
    (``benchmark=ami``, ``'benchmark=[ami,tedlium]'``, ``experiment=demo``, ``model/encoder=whisper_small``) against
    the ``conf_dir/<group>/<name>.yaml`` files first. Overrides that are not groups of ``conf_dir``, or that do not
    parse, are left to Hydra.

    Args:
        conf_dir: the entry point's config folder.
        argv: the command-line arguments (default ``sys.argv[1:]``).

    Raises:
        SystemExit: status :data:`USER_ERROR_EXIT` for an unknown option, after printing
            ``error: unknown <group> 'name'; known: ...``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    conf = Path(conf_dir)
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return
    for override in overrides:
        group = override.key_or_group
        folder = conf / group
        if override.is_delete() or group.startswith("hydra") or not folder.is_dir():
            continue
        try:
            names = _group_values(override)
        except Exception:  # noqa: BLE001 - interpolations, ranges: Hydra decides
            continue
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        unknown = [n for n in names if n not in known and n != "null"]
        if unknown:
            label = group.replace("/", ".")
            sys.stderr.write(f"error: unknown {label} {unknown[0]!r}; known: {', '.join(known)}\n")
            raise SystemExit(USER_ERROR_EXIT)
