"""The ``key=value`` command lines of the module entry points (``python -m aero_lightning.data.prepare``,
``python -m aero_lightning.hf.export``): help, argument errors and logging handled one way."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any


def run_key_value_cli(
    argv: Sequence[str] | None,
    usage: str,
    parse: Callable[[list[str]], dict[str, Any]],
    run: Callable[..., Any],
) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``parse`` and call ``run(**kwargs)`` with INFO logging.

    Raises:
        SystemExit: status 0 after printing ``usage`` for ``-h``, ``--help`` or ``help``; status 2 with the
            error and ``usage`` on stderr when ``parse`` raises ``ValueError``.
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
    return run(**kwargs)
