"""Hydra configs: every experiment composes and resolves; aero_full states the Aero-1-Audio architecture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from aero_lightning.model.aero import AeroModel
from aero_lightning.model.projector import AvgPoolProjector, MLPStackProjector
from aero_lightning.tasks.train import build_strategy

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(experiment: str, run_dir: Path, overrides: tuple[str, ...] = ()) -> DictConfig:
    """Compose ``train`` with ``experiment`` and return the job config resolved as ``@hydra.main`` would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)
    with open_dict(cfg):  # filled in by a real run
        cfg.hydra.runtime.cwd = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir / "outputs")
    HydraConfig.instance().set_config(cfg)
    try:
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.resolve(job)  # ${hydra:runtime.*} resolves against the HydraConfig set above
    finally:
        HydraConfig.instance().cfg = None
    return job


def test_experiments_exist():
    assert {"demo", "aero_full", "ablation_packing", "ablation_encoder", "ablation_zero"} <= set(EXPERIMENTS)


def test_aero_full_nodes_and_devices_from_the_command_line(tmp_path):
    cfg = _compose("aero_full", tmp_path, overrides=("trainer.devices=4", "trainer.num_nodes=4"))
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 4)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment, tmp_path, monkeypatch):
    monkeypatch.delenv("AERO_ROOT", raising=False)
    cfg = _compose(experiment, tmp_path)
    assert cfg.task_name == experiment
    assert cfg.paths.root_dir == str(tmp_path)
    assert cfg.paths.output_dir == str(tmp_path / "outputs")
    # one builder for every encoder type: no experiment overrides it
    assert cfg.model._target_ == "aero_lightning.model.build.build_aero_model"
    for key in ("encoder", "llm", "projector"):
        assert key in cfg.model
    projector = instantiate(cfg.model.projector)(encoder_dim=16, llm_dim=8)
    assert projector.output_lengths(8) >= 1
    # the non-model groups build (strategy, callbacks, logger); the data module is built without touching disk
    build_strategy(cfg.strategy)
    for name, callback in cfg.callbacks.items():
        assert instantiate(callback) is not None, name
    datamodule = instantiate(cfg.data)
    assert datamodule.train and datamodule.test_dir
    assert datamodule.packing_mode in ("padded", "packed") and datamodule.packing_length > 0


def test_aero_full_states_whisper_large_v3_and_qwen2_5_1_5b(tmp_path):
    cfg = _compose("aero_full", tmp_path)
    encoder, llm = cfg.model.encoder, cfg.model.llm
    assert encoder.name_or_path == "openai/whisper-large-v3"
    assert encoder.expect.d_model == 1280 and encoder.expect.num_mel_bins == 128
    assert encoder.expect.encoder_layers == 32
    assert llm.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert llm.expect.hidden_size == 1536 and llm.expect.num_hidden_layers == 28
    projector = instantiate(cfg.model.projector)(encoder_dim=1280, llm_dim=1536)
    assert type(projector) is AvgPoolProjector and projector.downsample == 2
    assert sum(p.numel() for p in projector.parameters()) == 1280 * 1536 + 1536
    assert cfg.trainer.devices * cfg.trainer.num_nodes == 16
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.strategy._target_ == "aero_lightning.strategies.AeroDeepSpeedStrategy"
    assert cfg.strategy.stage == 2 and not cfg.strategy.offload_optimizer  # ZeRO-2, as Aero trained
    assert cfg.model.liger is True and cfg.model.gradient_checkpointing is True
    assert cfg.model.freeze == []  # full fine-tuning


def test_aero_full_trains_on_the_registry_mixture_packed(tmp_path):
    from aero_lightning.data.corpora import CORPORA

    cfg = _compose("aero_full", tmp_path)
    assert list(cfg.data.val_dirs) == ["librispeech_dev_clean", "librispeech_dev_other"]
    assert set(cfg.data.train) == set(CORPORA) and len(cfg.data.train) >= 20
    assert cfg.data.packing.mode == "packed" and cfg.data.packing.packing_length == 32768
    for name, corpus in cfg.data.train.items():
        assert corpus.dir == f"{cfg.paths.data_dir}/{name}/train"


def test_demo_experiment_builds_the_model_from_config(tiny_dir, tmp_path):
    cfg = _compose("demo", tmp_path, overrides=(f"paths.demo_model_dir={tiny_dir}",))
    assert cfg.model.encoder.name_or_path == str(tiny_dir / "encoder")
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, AeroModel)
    assert isinstance(model.projector, MLPStackProjector) and model.projector.downsample == 4
    assert model.audio_token_counter()(480_000) == 375


def test_train_py_prints_aero_full_job_config(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=aero_full", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "openai/whisper-large-v3" in result.stdout
    assert "Qwen/Qwen2.5-1.5B-Instruct" in result.stdout
    assert not (tmp_path / "outputs").exists()  # --cfg runs nothing
