"""Load a trained model for inference from a Lightning checkpoint, a run folder or a ``save_pretrained`` folder.

Accepted ``ckpt`` values:

- a folder written by :meth:`AeroModel.save_pretrained` (holds ``aero_config.json``);
- a Lightning ``.ckpt`` file: the model config is the run's ``config.yaml`` (written by
  :func:`aero_lightning.tasks.train.train` into the run folder; checkpoints live in ``<run>/checkpoints/``), looked
  up next to the file and one and two folders above it; the weights are ``state_dict`` entries prefixed ``model.``;
- a run folder (holds ``config.yaml`` and ``checkpoints/last.ckpt``): its ``last.ckpt``.

A Lightning checkpoint rebuilds the model from the config (encoder and LLM ``from_pretrained`` from the paths or hub
ids the run used, tokenizer included) and then loads every weight from the checkpoint, so the base checkpoints must
still be reachable. Training-only switches are turned off for inference: Liger kernels, activation checkpointing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aero_lightning.model.aero import AeroModel

logger = logging.getLogger(__name__)

__all__ = ["find_run_config", "load_model", "resolve_checkpoint"]

MODEL_PREFIX = "model."
"""Prefix of the model's weights in a Lightning checkpoint of :class:`~aero_lightning.lit_module.AeroLitModule`."""


def resolve_checkpoint(ckpt: str | os.PathLike) -> Path:
    """The checkpoint file or ``save_pretrained`` folder that ``ckpt`` names.

    Raises:
        FileNotFoundError: if ``ckpt`` does not exist, or a run folder has no ``checkpoints/last.ckpt``.
        ValueError: for a DeepSpeed checkpoint folder (sharded; convert it first, the message says how).
    """
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; give a Lightning .ckpt, a training run folder (with "
            "checkpoints/last.ckpt) or a folder written by AeroModel.save_pretrained"
        )
    if path.is_file() or (path / "aero_config.json").is_file():
        return path
    if (path / "checkpoints" / "last.ckpt").is_dir():  # a DeepSpeed run folder: last.ckpt is itself a folder
        path = path / "checkpoints" / "last.ckpt"
    if (path / "checkpoint").is_dir() or (path / "latest").is_file():
        raise ValueError(
            f'{path} is a DeepSpeed checkpoint folder (sharded). Convert it to one file first: python -c "from '
            "lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict as c; "
            f"c('{path}', '{path}.fp32.ckpt')\", then pass ckpt={path}.fp32.ckpt"
        )
    last = path / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    raise FileNotFoundError(
        f"{path} is a folder without aero_config.json (save_pretrained) or checkpoints/last.ckpt (training run)"
    )


def find_run_config(ckpt_file: Path) -> Path:
    """The training run's ``config.yaml`` for a checkpoint file (same folder, parent, grandparent).

    Raises:
        FileNotFoundError: if none is found (the message lists where it looked).
    """
    candidates = [ckpt_file.parent / "config.yaml", ckpt_file.parent.parent / "config.yaml"]
    candidates.append(ckpt_file.parent.parent.parent / "config.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no config.yaml for {ckpt_file}: looked for {[str(c) for c in candidates]}. Training writes it into the "
        "run folder (<run>/config.yaml next to <run>/checkpoints/); copy it there or pass config=PATH"
    )


def _model_from_config(config_file: Path, attn_implementation: str | None) -> AeroModel:
    cfg = OmegaConf.load(config_file)
    if "model" not in cfg:
        raise ValueError(f"{config_file} has no 'model' section; it is not a training run's config.yaml")
    model_cfg = cfg.model
    # inference: no Liger kernels, no activation checkpointing; every weight comes from the checkpoint, so the
    # run's init_from source need not exist any more
    for key, value in (("liger", False), ("gradient_checkpointing", False), ("init_from", None)):
        if key in model_cfg:
            model_cfg[key] = value
    if attn_implementation is not None:
        model_cfg.attn_implementation = attn_implementation
    return instantiate(model_cfg, _convert_="all")


def lightning_model_weights(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The :class:`AeroModel` weights of a Lightning ``.ckpt`` file, named as in ``AeroModel.state_dict()``, and
    the checkpoint's ``global_step`` (None when absent).

    Raises:
        ValueError: if the file has no ``state_dict`` or no weight under :data:`MODEL_PREFIX`.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in state:
        raise ValueError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    weights = {
        k[len(MODEL_PREFIX) :]: v for k, v in state["state_dict"].items() if k.startswith(MODEL_PREFIX)
    }
    if not weights:
        raise ValueError(f"{path} holds no weights under the prefix {MODEL_PREFIX!r}")
    return weights, state.get("global_step")


def load_model(
    ckpt: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
) -> AeroModel:
    """Load an :class:`AeroModel` for inference (eval mode, no gradients).

    Args:
        ckpt: a Lightning ``.ckpt``, a run folder, or a ``save_pretrained`` folder (module docstring).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; None = CUDA when available, else CPU.
        dtype: ``"float32"``, ``"bfloat16"``, ...; None keeps the loaded dtype (float32 for the demo).
        config: the run's ``config.yaml`` when it is not next to the checkpoint.
        attn_implementation: override the config's attention backend (``varlen``, ``sdpa``, ...).

    Returns:
        The model on ``device``, in eval mode.

    Raises:
        FileNotFoundError, ValueError: see :func:`resolve_checkpoint` and :func:`find_run_config`.
        RuntimeError: if the checkpoint's weights do not fit the config's model (missing or unexpected keys).
    """
    path = resolve_checkpoint(ckpt)
    if path.is_dir():
        model = AeroModel.from_pretrained(path, attn_implementation=attn_implementation or "sdpa")
        source = f"save_pretrained folder {path}"
    else:
        config_file = Path(config) if config is not None else find_run_config(path)
        model = _model_from_config(config_file, attn_implementation)
        weights, step = lightning_model_weights(path)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{path} does not fit the model of {config_file}: missing {list(missing)[:8]} "
                f"(+{max(0, len(missing) - 8)}), unexpected {list(unexpected)[:8]} (+{max(0, len(unexpected) - 8)})"
            )
        source = f"checkpoint {path} (step {'?' if step is None else step}, config {config_file})"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=torch.device(device))
    if dtype is not None:
        model = model.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded %s on %s", source, device)
    return model
