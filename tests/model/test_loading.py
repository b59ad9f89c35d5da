"""load_model: Lightning checkpoint + the run's config.yaml, run folder, save_pretrained folder; clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.aero_runs import write_lightning_run

from aero_lightning.model.build import load_model, resolve_checkpoint, save_pretrained


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, write_lightning_run(run_dir, tiny_dir, seed=1)


def test_checkpoint_run_folder_and_save_pretrained_give_the_same_model(run, tmp_path):
    run_dir, ckpt = run
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model = load_model(ckpt, device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0)
    assert resolve_checkpoint(run_dir) == ckpt  # a run folder means its last.ckpt
    save_pretrained(model, tmp_path / "pretrained")
    again = load_model(tmp_path / "pretrained", device="cpu")
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0)


def test_missing_files_fail_with_a_clear_message(run, tmp_path):
    _, ckpt = run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.ckpt")
    lonely = tmp_path / "lonely" / "checkpoints" / "last.ckpt"
    lonely.parent.mkdir(parents=True)
    shutil.copy(ckpt, lonely)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_model(lonely)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="aero_config.json"):
        load_model(tmp_path / "empty")


def test_weights_that_do_not_fit_the_config_are_rejected(run, tmp_path):
    run_dir, ckpt = run
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["state_dict"].pop("model.projector.fc1.weight")
    bad = run_dir / "checkpoints" / "bad.ckpt"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match="missing .*projector.fc1.weight"):
        load_model(bad)


@pytest.mark.parametrize("given", ["run", "last.ckpt"])
def test_deepspeed_checkpoint_folder_asks_for_conversion(tmp_path, given):
    # a DeepSpeed run: checkpoints/last.ckpt is a folder of shards with a `checkpoint/` subfolder
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (last / "checkpoint").mkdir(parents=True)
    with pytest.raises(ValueError, match="convert_zero_checkpoint_to_fp32_state_dict"):
        resolve_checkpoint(tmp_path / "run" if given == "run" else last)
