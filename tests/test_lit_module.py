"""AeroLitModule options checked when the module is built."""

from __future__ import annotations

from types import SimpleNamespace

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


def test_lr_groups_give_the_projector_its_own_peak_lr_on_the_same_schedule(model):
    module = AeroLitModule(
        model, lr=1e-5, warmup_steps=10, min_lr_ratio=0.1, lr_groups={"^projector\\.": 1e-4}
    )
    module._trainer = SimpleNamespace(max_steps=100)
    optim = module.configure_optimizers()
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    projector = {id(p) for p in model.projector.parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_lr[id(p)] = (group["initial_lr"], group["weight_decay"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(by_lr) == len(trainable)  # every trainable parameter exactly once
    for p in trainable:
        lr, decay = by_lr[id(p)]
        assert lr == (1e-4 if id(p) in projector else 1e-5)
        assert decay == (0.01 if p.ndim >= 2 else 0.0)
    for _ in range(10):  # end of warmup: every group at its peak, same multiplier
        optimizer.step()
        scheduler.step()
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == [1e-5, 1e-4]


def test_lr_groups_pattern_matching_nothing_raises(model):
    module = AeroLitModule(model, lr_groups={"^adapter\\.": 1e-4})
    module._trainer = SimpleNamespace(max_steps=100)
    with pytest.raises(ValueError, match=r"lr_groups patterns \['\^adapter\\\\.'\] match no trainable"):
        module.configure_optimizers()
