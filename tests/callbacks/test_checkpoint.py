"""FinalStepModelCheckpoint with save_last="link": a resumed run keeps last.ckpt as its link."""

from __future__ import annotations

import pytest

from aero_lightning.callbacks.checkpoint import FinalStepModelCheckpoint


def _callback(dirpath, save_last="link") -> FinalStepModelCheckpoint:
    return FinalStepModelCheckpoint(
        dirpath=dirpath, filename="step{step:07d}", save_last=save_last, save_top_k=-1, every_n_train_steps=2
    )


def test_resume_in_link_mode_owns_last_ckpt(tmp_path):
    """The first step checkpoint of a run is written before Lightning sets last_model_path (empty in its state);
    resumed from it in the same folder, the callback takes dirpath/last.ckpt as its own, so the next save re-links
    last.ckpt instead of creating last-v1.ckpt (tests/test_strategies.py's train.py FSDP2 resume checks the
    files)."""
    first = _callback(tmp_path)
    saved = first.state_dict()
    assert saved["last_model_path"] == "" and saved["dirpath"] == str(tmp_path)
    resumed = _callback(tmp_path)
    resumed.load_state_dict(saved)
    assert resumed.last_model_path == str(tmp_path / "last.ckpt")
    # another folder: Lightning restores no paths, so neither does the callback
    elsewhere = _callback(tmp_path / "other")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        elsewhere.load_state_dict(saved)
    assert elsewhere.last_model_path == ""
    # save_last=True writes last.ckpt with its own state (last_model_path set): nothing to repair
    copy_mode = _callback(tmp_path, save_last=True)
    copy_mode.load_state_dict(saved)
    assert copy_mode.last_model_path == ""
