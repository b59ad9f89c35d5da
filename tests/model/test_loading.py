"""load_model: Lightning checkpoint + the run's model/ folder (or an older run's config.yaml), run folder,
save_pretrained folder; clear errors."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from helpers.aero_runs import write_lightning_run
from helpers.tiny import build_tiny

from aero_lightning.errors import UserError
from aero_lightning.model.build import (
    checkpoint_kind,
    load_model,
    model_from_run_folder,
    resolve_checkpoint,
    save_pretrained,
)


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
    with pytest.raises(FileNotFoundError, match="no model/ folder or config.yaml"):
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
@pytest.mark.parametrize(("marker", "kind"), [("checkpoint/", "deepspeed"), (".metadata", "distributed")])
def test_sharded_checkpoint_folders_are_resolved_not_refused(tmp_path, given, marker, kind):
    """A DeepSpeed run's checkpoints/last.ckpt is a folder with a `checkpoint/` tag folder, an FSDP2 run's one with
    `.metadata` (torch.distributed.checkpoint): both are checkpoints load_model consolidates (tests/test_strategies.py
    loads real ones), no longer refused."""
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.mkdir(parents=True)
    if marker.endswith("/"):
        (last / marker).mkdir()
    else:
        (last / marker).write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "run" if given == "run" else last) == last
    assert checkpoint_kind(last) == kind


def test_last_ckpt_link_is_followed(run, tmp_path):
    """save_last: link makes checkpoints/last.ckpt a relative symbolic link to the newest step checkpoint:
    resolve_checkpoint keeps the link path (config.yaml is found from it) and load_model reads the step file. A link
    whose target was deleted is named in the error."""
    run_dir, ckpt = run
    linked = tmp_path / "linked"
    (linked / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", linked / "config.yaml")
    shutil.copy(ckpt, linked / "checkpoints" / "step0000002.ckpt")
    last = linked / "checkpoints" / "last.ckpt"
    last.symlink_to("step0000002.ckpt")
    assert resolve_checkpoint(linked) == last and checkpoint_kind(last) == "lightning"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in load_model(linked, device="cpu").state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0)
    (linked / "checkpoints" / "step0000002.ckpt").unlink()
    with pytest.raises(
        FileNotFoundError, match="last.ckpt is a link to step0000002.ckpt, which does not exist"
    ):
        resolve_checkpoint(linked)


def test_a_run_loads_from_its_own_model_folder_not_from_the_components_it_started_from(tmp_path, caplog):
    """The demo's component folder is rebuilt in place with a tokenizer trained on other texts (as `make demo-long`
    does): the run still loads the tokenizer it was trained with, and still loads once the folder is gone."""
    components = build_tiny(tmp_path / "components", ["the cat sat on the mat", "hello world"] * 4)
    run_dir = tmp_path / "run"
    ckpt = write_lightning_run(run_dir, components, seed=2)
    trained_vocab = load_model(ckpt, device="cpu").tokenizer.get_vocab()
    shutil.rmtree(components)
    build_tiny(components, ["zebras quietly juggle xylophones", "vexing fjords wax"] * 4)
    with caplog.at_level(logging.WARNING, logger="aero_lightning.model.build"):
        model = load_model(run_dir, device="cpu")
    assert model.tokenizer.get_vocab() == trained_vocab
    assert not [r for r in caplog.records if "config.yaml" in r.getMessage()]  # no fallback to the old way
    shutil.rmtree(components)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run_dir, moved)
    state = torch.load(moved / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    model = load_model(moved, device="cpu")
    assert model.tokenizer.get_vocab() == trained_vocab
    assert model.tokenizer.chat_template and "<|AUDIO|>" in trained_vocab
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state["state_dict"][f"model.{name}"], rtol=0, atol=0)


def test_the_model_folder_records_settings_and_no_weights(run):
    run_dir, _ = run
    folder = run_dir / "model"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".pt"))]
    assert {"aero_model.json", "encoder/config.json", "llm/config.json", "llm/tokenizer.json"} <= set(names)
    spec = json.loads((folder / "aero_model.json").read_text())
    assert spec["encoder"] == {
        "type": "whisper",
        "padding_free": True,
        "attn_implementation": "varlen",
        "torch_dtype": "float32",
    }
    assert spec["projector"] == {
        "type": "mlp_stack",
        "stack_factor": 4,
        "hidden_dim": 512,
        "output_norm": False,
    }
    assert (spec["ctc_weight"], spec["end_of_turn_token"]) == (0.5, "<|im_end|>")
    model = model_from_run_folder(folder, attn_implementation="sdpa")
    assert model.llm.config._attn_implementation == "sdpa" and hasattr(model, "ctc_head")


def test_an_older_run_without_a_model_folder_loads_from_config_yaml_with_a_warning(
    tiny_dir, tmp_path, caplog
):
    ckpt = write_lightning_run(tmp_path / "old", tiny_dir, seed=3, run_model=False)
    with caplog.at_level(logging.WARNING, logger="aero_lightning.model.build"):
        model = load_model(ckpt, device="cpu")
    assert any("has no model/ folder" in r.getMessage() for r in caplog.records)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0)


def test_a_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.ckpt")
