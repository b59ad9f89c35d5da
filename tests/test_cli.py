"""The key=value entry points: help, argument errors, and the call through."""

from __future__ import annotations

import pytest

from aero_lightning.cli import run_key_value_cli
from aero_lightning.data import cache_encoder, prepare
from aero_lightning.hf import export


def _parse(args: list[str]) -> dict:
    pairs = dict(a.split("=", 1) for a in args if "=" in a)
    if len(pairs) != len(args):
        raise ValueError(f"expected key=value, got {args}")
    return pairs


def test_key_values_reach_the_function():
    assert run_key_value_cli(["a=1", "b=x"], "usage\n", _parse, lambda **kw: kw) == {"a": "1", "b": "x"}


@pytest.mark.parametrize(
    "main", [prepare.main, export.main, cache_encoder.main], ids=["prepare", "export", "cache_encoder"]
)
def test_help_prints_the_usage_and_exits_0(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    "main", [prepare.main, export.main, cache_encoder.main], ids=["prepare", "export", "cache_encoder"]
)
def test_a_bad_argument_exits_2_with_the_error_and_usage(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["not-a-key-value"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "usage" in err.lower()
