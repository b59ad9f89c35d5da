"""Test helpers: a training run folder as `train.py` leaves it (config.yaml, model/, Lightning checkpoint), and
espeak-ng speech clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from aero_lightning.model.build import save_run_model

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "a bird in the hand is worth two in the bush",
    "every cloud has a silver lining",
    "the early bird catches the worm",
    "all that glitters is not gold",
]


def compose_train(run_dir: Path, overrides: tuple[str, ...] = ()):
    """The resolved job config of ``train.py`` with ``overrides``, as the run would write it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.resolve(job)
    finally:
        HydraConfig.instance().cfg = None
    return job


def write_lightning_run(
    run_dir: Path,
    model_dir: Path,
    seed: int = 0,
    plain_text: bool = False,
    run_model: bool = True,
    overrides: tuple[str, ...] = (),
) -> Path:
    """A demo run folder: ``config.yaml``, ``model/`` (``save_run_model``, unless ``run_model`` is False: a run
    written before runs carried it) and ``checkpoints/last.ckpt`` (weights under ``state_dict`` with the ``model.``
    prefix), from the tiny components in ``model_dir``. Returns the checkpoint path.

    ``plain_text`` zeroes the (tied) embedding rows of the special and whitespace-only tokens, so the random
    model's greedy replies are visible text instead of tokens that decoding removes or strips (texts to compare are
    then not all empty). ``overrides`` are further train.py overrides (another encoder: ``model/encoder=...``).
    """
    cfg = compose_train(run_dir, ("experiment=demo", f"paths.demo_model_dir={model_dir}", *overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(seed)
    model = instantiate(cfg.model, _convert_="all")
    if plain_text:
        tok = model.tokenizer
        blank = [i for i in range(len(tok)) if i in tok.all_special_ids or not tok.decode([i]).strip()]
        with torch.no_grad():
            model.llm.get_input_embeddings().weight[blank] = 0.0
    if run_model:
        save_run_model(model, run_dir / "model")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 0}
    torch.save(state, ckpt)
    return ckpt


def speak(text: str, voice: int = 0) -> np.ndarray:
    """16 kHz mono float32 espeak-ng speech of ``text``."""
    from aero_lightning.data.synth import VoiceSpec, synthesize

    spec = VoiceSpec("gmw/en-US" if voice % 2 == 0 else "gmw/en", "m1" if voice % 3 else "f2", 170, 50)
    return synthesize(text, spec)
