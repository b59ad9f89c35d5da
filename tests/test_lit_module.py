"""AeroLitModule options checked when the module is built."""

from __future__ import annotations

import pytest

from aero_lightning.lit_module import AeroLitModule


@pytest.mark.parametrize(
    ("unfreeze", "message"),
    [
        ({"at_step": 0, "patterns": ["^encoder\\."]}, "at_step >= 1"),
        ({"at_step": 10, "patterns": []}, "non-empty patterns"),
        ({"at_step": 10, "patterns": ["^encoder\\."], "lr_scale": 0.0}, "lr_scale must be > 0"),
        ({"at_step": 10, "patterns": ["^encoder\\."], "warmup_steps": -1}, "warmup_steps >= 0"),
        ({"at_step": 10, "patterns": ["^encoder\\."], "step": 5}, r"unknown keys \['step'\]"),
    ],
)
def test_bad_unfreeze_options_raise_with_what_to_change(model, unfreeze, message):
    with pytest.raises(ValueError, match=message):
        AeroLitModule(model, unfreeze=unfreeze)


def test_unfreeze_pattern_matching_no_frozen_parameter_raises_when_optimizers_are_built(make_model):
    module = AeroLitModule(
        make_model(freeze=["^encoder\\."]), unfreeze={"at_step": 5, "patterns": ["^llm\\."]}
    )
    with pytest.raises(ValueError, match=r"\['\^llm\\\\.'\] match no frozen parameter"):
        module.configure_optimizers()


def test_unfreeze_off_by_default_and_with_null(model):
    assert AeroLitModule(model).unfreeze is None
    assert AeroLitModule(model, unfreeze=None).unfreeze is None
