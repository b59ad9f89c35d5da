"""The ``key=value`` command lines of the module entry points (``python -m aero_lightning.data.prepare``,
``python -m aero_lightning.hf.export``): help, argument errors and logging handled one way."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from aero_lightning.errors import USER_ERROR_EXIT, UserError, report_user_error


def run_key_value_cli(
    argv: Sequence[str] | None,
    usage: str,
    parse: Callable[[list[str]], dict[str, Any]],
    run: Callable[..., Any],
) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``parse`` and call ``run(**kwargs)`` with INFO logging.

    Raises:
        SystemExit: status 0 after printing ``usage`` for ``-h``, ``--help`` or ``help``; status 2 with the
            error and ``usage`` on stderr when ``parse`` raises ``ValueError``; status 2 with one ``error:`` line
            when ``run`` raises a :class:`~aero_lightning.errors.UserError` or a ``FileNotFoundError`` (a missing
            checkpoint, source folder or data folder, an unknown corpus).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        sys.stdout.write(usage)
        raise SystemExit(0)
    try:
        kwargs = parse(args)
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n\n{usage}")
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(**kwargs)
    except (UserError, FileNotFoundError) as err:
        report_user_error(err)
        raise SystemExit(USER_ERROR_EXIT) from None
