"""Build, persist and load an :class:`~aero_lightning.model.aero.AeroModel`.

- :func:`build_aero_model` (``conf/model/aero.yaml``'s ``_target_``) loads the encoder and the LLM with the real
  ``from_pretrained`` (a hub id or a local folder), dispatching on ``model.encoder.type``: ``whisper`` (default,
  :class:`~aero_lightning.model.encoders.WhisperAudioEncoder`), ``hubert`` or ``wav2vec2``
  (:class:`~aero_lightning.model.ssl_encoders.SSLAudioEncoder`). It checks each component's architecture against the
  config, builds a fresh projector, adds LoRA adapters (``model.lora``, :mod:`aero_lightning.model.lora`), and copies
  weights from an earlier run (``init_from``), adapters included.
- :func:`save_pretrained` / :func:`from_pretrained`: a self-describing folder (``encoder/``, ``llm/`` with the
  tokenizer, ``projector.safetensors``, ``aero_config.json``).
- :func:`save_run_model` / :func:`model_from_run_folder`: the run's own model folder (``<run>/model/``: component
  configs, the tokenizer with its chat template, the AeroModel settings; no weights), written when training
  starts, so that a run folder loads wherever it is copied.
- :func:`load_model`: a model for inference from a Lightning checkpoint, a run folder or a ``save_pretrained``
  folder. A Lightning checkpoint (checkpoints live in ``<run>/checkpoints/``) is rebuilt from the run's
  ``model/`` folder, looked up next to the file and one and two folders above it, with random weights, then every
  weight is loaded from the checkpoint (``state_dict`` entries prefixed ``model.``): nothing outside the run
  folder is read, neither the encoder and LLM folders or hub ids the run started from nor the data folders. A run
  written before that folder existed is rebuilt from its ``config.yaml`` instead, with a warning: that reads the
  encoder, LLM and tokenizer from the paths the config names. The checkpoint is a ``.ckpt`` file, or a folder of
  shards that is consolidated in memory: an FSDP2 distributed checkpoint (``torch.distributed.checkpoint``) or a
  DeepSpeed ZeRO checkpoint (fp32 master weights). Training-only switches are off for inference: Liger kernels,
  activation checkpointing, ``init_from``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from aero_lightning.data.chat import AUDIO_SPECIAL_TOKENS
from aero_lightning.errors import UserFileNotFoundError, UserValueError
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.encoders import PaddingFreeWhisperEncoder, WhisperAudioEncoder
from aero_lightning.model.lora import is_adapter_name, map_lora_names, merged_state_dict
from aero_lightning.model.projector import PROJECTORS, Projector, projector_spec
from aero_lightning.model.ssl_encoders import SSL_TYPES, SSLAudioEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_TYPES",
    "build_aero_model",
    "check_architecture",
    "checkpoint_kind",
    "deepspeed_checkpoint_state_dict",
    "distributed_checkpoint_state_dict",
    "ensure_audio_tokens",
    "find_run_config",
    "find_run_model",
    "from_pretrained",
    "lightning_model_weights",
    "load_encoder",
    "load_model",
    "load_weights_from",
    "model_from_run_folder",
    "resolve_checkpoint",
    "save_pretrained",
    "save_run_model",
    "sharded_model_weights",
]

ENCODER_TYPES = ("whisper", *SSL_TYPES)
"""Values of ``model.encoder.type``."""

MODEL_PREFIX = "model."
"""Prefix of the model's weights in a Lightning checkpoint of :class:`~aero_lightning.lit_module.AeroLitModule`."""


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, value)


# ----------------------------------------------------------------------------------------- components


def check_architecture(name: str, config, expect: Mapping | None) -> None:
    """Check a loaded component's config against the architecture the experiment config states.

    Raises:
        ValueError: listing every mismatching field, e.g. a Whisper-small checkpoint under an experiment that
            expects Whisper-large-v3's ``d_model: 1280``.
    """
    wrong = {
        k: (v, getattr(config, k, None)) for k, v in (expect or {}).items() if getattr(config, k, None) != v
    }
    if wrong:
        detail = ", ".join(f"{k}: expected {v[0]}, checkpoint has {v[1]}" for k, v in wrong.items())
        raise ValueError(f"model.{name} checkpoint does not match model.{name}.expect ({detail})")


def ensure_audio_tokens(tokenizer, llm: PreTrainedModel) -> None:
    """Add the audio special tokens to ``tokenizer`` if missing, and grow the LLM's embeddings to fit.

    Qwen2.5's tokenizer has no audio tokens (Qwen2-Audio's has); its embedding matrix is padded to 151 936 rows, so
    the new ids usually fit without resizing.
    """
    missing = [
        t
        for t in AUDIO_SPECIAL_TOKENS
        if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
    ]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
        logger.info("added audio special tokens %s to the tokenizer", missing)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))


def load_encoder(spec: Mapping, attn_implementation: str | None = None) -> nn.Module:
    """Load the audio encoder that ``spec`` (``model.encoder``) names, with ``from_pretrained``.

    Args:
        spec: ``{"type": "whisper" | "hubert" | "wav2vec2", "name_or_path", "attn_implementation", "torch_dtype",
            "expect"}``; Whisper adds ``padding_free``, the SSL encoders ``normalize`` and ``spec_augment``.
        attn_implementation: overrides a Whisper encoder's own backend (the model-wide ``attn_implementation``,
            e.g. ``varlen``); the SSL encoders keep their own (``sdpa`` by default).

    Returns:
        A :class:`WhisperAudioEncoder` or :class:`SSLAudioEncoder`.

    Raises:
        ValueError: for an unknown ``type``, a checkpoint of another type, or an architecture that does not match
            ``expect``.
        OSError: from transformers when the hub id or folder cannot be loaded.
    """
    kind = spec.get("type", "whisper")
    if kind not in ENCODER_TYPES:
        raise ValueError(f"model.encoder.type must be one of {ENCODER_TYPES}, got {kind!r}")
    if kind == "whisper":
        encoder = WhisperAudioEncoder.from_pretrained(
            spec["name_or_path"],
            padding_free=spec.get("padding_free", True),
            attn_implementation=attn_implementation or spec.get("attn_implementation", "sdpa"),
            torch_dtype=spec.get("torch_dtype"),
        )
    else:
        encoder = SSLAudioEncoder.from_pretrained(
            spec["name_or_path"],
            normalize=spec.get("normalize", True),
            attn_implementation=spec.get("attn_implementation") or "sdpa",
            torch_dtype=spec.get("torch_dtype"),
            spec_augment=spec.get("spec_augment", False),
        )
        if encoder.encoder.config.model_type != kind:
            raise ValueError(
                f"model.encoder.type is {kind!r} but {spec['name_or_path']} is a "
                f"{encoder.encoder.config.model_type}"
            )
    check_architecture("encoder", encoder.encoder.config, spec.get("expect"))
    return encoder


def _load_llm(spec: Mapping, attn_implementation: str | None) -> tuple[PreTrainedModel, object]:
    kwargs = {"attn_implementation": attn_implementation or spec.get("attn_implementation", "sdpa")}
    if spec.get("torch_dtype") is not None:
        kwargs["dtype"] = _dtype(spec["torch_dtype"])
    llm = AutoModelForCausalLM.from_pretrained(spec["name_or_path"], **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.get("tokenizer") or spec["name_or_path"])
    check_architecture("llm", llm.config, spec.get("expect"))
    return llm, tokenizer


def build_aero_model(
    encoder: Mapping,
    llm: Mapping,
    projector: Callable[..., Projector],
    freeze: Sequence[str] = (),
    gradient_checkpointing: bool = False,
    end_of_turn_token: str = "<|im_end|>",
    ctc_weight: float = 0.0,
    attn_implementation: str | None = None,
    liger: Mapping | bool | None = None,
    loss_chunk_tokens: int = 4096,
    ctc_only: bool = False,
    init_from: Mapping | None = None,
    lora: Mapping | None = None,
) -> AeroModel:
    """Load encoder and LLM with ``from_pretrained``, build a fresh projector, and assemble the model.

    Args:
        encoder: ``model.encoder`` (:func:`load_encoder`).
        llm: ``{"name_or_path", "attn_implementation", "torch_dtype", "tokenizer", "expect"}`` (``tokenizer``
            defaults to ``name_or_path``).
        projector: a callable ``projector(encoder_dim=..., llm_dim=...)`` (a Hydra ``_partial_`` config).
        freeze, gradient_checkpointing, end_of_turn_token, ctc_weight, liger, loss_chunk_tokens, ctc_only: see
            :class:`~aero_lightning.model.aero.AeroModel`.
        attn_implementation: attention backend of the LLM and of a Whisper encoder (``varlen``,
            ``flash_attention_2``, ``sdpa``, ``eager``; :mod:`aero_lightning.model.attention`); None keeps each
            component's own ``attn_implementation``.
        init_from: ``{"ckpt": PATH, "include": [regex, ...]}``: then copy the matching weights from an earlier run
            (:func:`load_weights_from`), e.g. the encoder of a ``ctc_only`` pre-training run. It runs after the
            LoRA adapters are added, so it restores a LoRA run's adapters too.
        lora: ``model.lora`` (``conf/model/lora/*.yaml``): LoRA adapters on the layers its ``target_modules``
            regexes name (:mod:`aero_lightning.model.lora`), added to the loaded weights; None or
            ``target_modules: null`` for none.

    Returns:
        The :class:`~aero_lightning.model.aero.AeroModel`.

    Raises:
        ValueError: see :func:`load_encoder`, :func:`check_architecture` and :func:`load_weights_from`.
        OSError: from transformers when a hub id or folder cannot be loaded.
    """
    enc = load_encoder(encoder, attn_implementation)
    lm, tokenizer = _load_llm(llm, attn_implementation)
    proj = projector(encoder_dim=enc.hidden_size, llm_dim=lm.config.hidden_size)
    ensure_audio_tokens(tokenizer, lm)
    model = AeroModel(
        enc,
        proj,
        lm,
        tokenizer,
        freeze=freeze,
        gradient_checkpointing=gradient_checkpointing,
        end_of_turn_token=end_of_turn_token,
        ctc_weight=ctc_weight,
        liger=liger,
        loss_chunk_tokens=loss_chunk_tokens,
        ctc_only=ctc_only,
        lora=lora,
    )
    if init_from and init_from.get("ckpt"):
        load_weights_from(model, init_from["ckpt"], init_from.get("include") or [r"^encoder\."])
    if encoder.get("type", "whisper") != "whisper":
        logger.info(
            "AeroModel with a %s encoder (%s) reading raw waveforms", encoder["type"], encoder["name_or_path"]
        )
    return model


# ------------------------------------------------------------------------------ checkpoints of runs


SHARDED_KINDS = ("distributed", "deepspeed")
"""Checkpoint folders with one shard per rank that :func:`sharded_model_weights` consolidates."""


def checkpoint_kind(path: Path) -> str | None:
    """What a checkpoint path holds (symbolic links are followed).

    Returns:
        ``"lightning"`` (a ``.ckpt`` file), ``"pretrained"`` (a :func:`save_pretrained` folder: ``aero_config.json``),
        ``"distributed"`` (a ``torch.distributed.checkpoint`` folder: ``.metadata`` and one ``*.distcp`` per rank,
        written by Lightning's ``ModelParallelStrategy``, i.e. FSDP2, with ``save_distributed_checkpoint``),
        ``"deepspeed"`` (a DeepSpeed checkpoint folder, any ZeRO stage: a ``latest`` file naming the tag folder, or a
        ``checkpoint/`` tag folder as Lightning's ``DeepSpeedStrategy`` writes it), or None for anything else.
    """
    if path.is_file():
        return "lightning"
    if not path.is_dir():
        return None
    if (path / "aero_config.json").is_file():
        return "pretrained"
    if (path / ".metadata").is_file():
        return "distributed"
    if (path / "latest").is_file() or (path / "checkpoint").is_dir():
        return "deepspeed"
    return None


def resolve_checkpoint(ckpt: str | os.PathLike) -> Path:
    """The checkpoint that ``ckpt`` names: a file or folder of a kind :func:`checkpoint_kind` knows.

    Accepts a Lightning ``.ckpt`` file, a sharded checkpoint folder (FSDP2 distributed checkpoint, DeepSpeed ZeRO), a
    ``save_pretrained`` folder, or a run folder, meaning its ``checkpoints/last.ckpt`` (any of these kinds, or a
    symbolic link to one, as ``save_last: link`` writes it). The path is returned as given, not with links resolved.

    Raises:
        FileNotFoundError: if ``ckpt`` does not exist, ``checkpoints/last.ckpt`` is a link to a missing checkpoint,
            or the folder is none of the above.
    """
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise UserFileNotFoundError(
            f"checkpoint {path} does not exist; give a Lightning .ckpt, a training run folder (with "
            "checkpoints/last.ckpt) or a folder written by save_pretrained"
        )
    if checkpoint_kind(path) is not None:
        return path
    last = path / "checkpoints" / "last.ckpt"
    if last.is_symlink() and not last.exists():
        raise UserFileNotFoundError(f"{last} is a link to {os.readlink(last)}, which does not exist")
    if checkpoint_kind(last) is not None:
        return last
    raise UserFileNotFoundError(
        f"{path} is a folder without aero_config.json (save_pretrained), checkpoints/last.ckpt (training run), "
        ".metadata (FSDP2 distributed checkpoint) or latest (DeepSpeed checkpoint)"
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
    raise UserFileNotFoundError(
        f"no model/ folder or config.yaml for {ckpt_file}: looked for {[str(c) for c in candidates]}. Training "
        "writes both into the run folder (next to <run>/checkpoints/); copy the checkpoint with its run folder, "
        "or pass config=PATH"
    )


def lightning_model_weights(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The :class:`AeroModel` weights of a Lightning ``.ckpt`` file, named as in ``AeroModel.state_dict()``, and
    the checkpoint's ``global_step`` (None when absent).

    Raises:
        ValueError: if the file cannot be read by ``torch.load`` (not a checkpoint, or cut short), has no
            ``state_dict`` or no weight under :data:`MODEL_PREFIX`; the first two are
            :class:`~aero_lightning.errors.UserError`.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        raise UserValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); give a Lightning .ckpt, a run "
            "folder or a save_pretrained folder"
        ) from err
    if not isinstance(state, Mapping) or "state_dict" not in state:
        raise UserValueError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    return _model_prefixed(state["state_dict"], path), state.get("global_step")


def _model_prefixed(state_dict: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The :data:`MODEL_PREFIX` entries of a LightningModule state dict, prefix removed.

    Raises:
        ValueError: if there is none.
    """
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
    if not weights:
        raise ValueError(f"{path} holds no weights under the prefix {MODEL_PREFIX!r}")
    return weights


def distributed_checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The LightningModule ``state_dict`` of a ``torch.distributed.checkpoint`` folder, whole, on the CPU.

    Lightning's ``ModelParallelStrategy`` saves ``{"state_dict": module state dict, "optimizer_0": ...}`` with
    ``torch.distributed.checkpoint`` (its non-tensor state goes to ``meta.pt``); the storage metadata names every
    tensor ``state_dict.<name>`` with its global size and dtype. Only those tensors are read, into whole tensors
    allocated here, in this process alone (``no_dist``): the optimizer states, twice the model in fp32 for Adam,
    are never loaded, and nothing is written to disk (``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``
    and Lightning's ``consolidate_checkpoint`` write the whole checkpoint, optimizer states included, to a file).

    Args:
        path: the checkpoint folder (``.metadata``, ``__<rank>_0.distcp``).

    Returns:
        ``{name: tensor}`` with the LightningModule's names (``model.encoder...``).

    Raises:
        ValueError: if the checkpoint holds no ``state_dict`` tensors.
    """
    import warnings

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    prefix = "state_dict."
    state = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(
            f"{path} is a distributed checkpoint without 'state_dict' tensors: not a Lightning Trainer's"
        )
    with warnings.catch_warnings():  # single-process loading is the intent here
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        dcp_load({"state_dict": state}, storage_reader=reader, no_dist=True)  # fills the tensors in place
    return state


def deepspeed_checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The LightningModule ``state_dict`` of a DeepSpeed checkpoint folder (ZeRO stage 1, 2 or 3), fp32, on the CPU.

    DeepSpeed's own consolidation (``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``)
    reassembles the fp32 master weights from every rank's optimizer partition (the same as Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict``, without writing a file); a ``_forward_module.`` prefix (a
    wrapped module) is removed.

    Args:
        path: the folder Lightning's ``DeepSpeedStrategy`` saved (``latest`` and the ``checkpoint/`` tag folder).

    Raises:
        ImportError: if deepspeed is not installed.
    """
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ImportError(
            f"{path} is a DeepSpeed checkpoint; reading it needs the deepspeed package (pip install -e '.[deepspeed]')"
        ) from err
    tag = None if (path / "latest").is_file() else "checkpoint"
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}


def _sharded_step(path: Path, kind: str) -> int | None:
    """``global_step`` of a sharded checkpoint (Lightning's client state), None when not found."""
    if kind == "distributed":
        files = [path / "meta.pt"]
    else:  # DeepSpeed: the client state rides in the model-states files (memory-mapped: only the step is read)
        files = sorted(path.glob("*/*mp_rank_00_model_states.pt"))
    for file in files[:1]:
        if file.is_file():
            return torch.load(file, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    return None


def sharded_model_weights(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The :class:`AeroModel` weights of a sharded checkpoint folder, consolidated in memory, and its step.

    Args:
        path: an FSDP2 distributed checkpoint or a DeepSpeed ZeRO folder (:func:`checkpoint_kind`).

    Returns:
        ``({name as in AeroModel.state_dict(): tensor}, global_step or None)``.

    Raises:
        ValueError: if ``path`` is not a sharded checkpoint or holds no model weights.
        ImportError: see :func:`deepspeed_checkpoint_state_dict`.
    """
    kind = checkpoint_kind(path)
    if kind == "distributed":
        state = distributed_checkpoint_state_dict(path)
    elif kind == "deepspeed":
        state = deepspeed_checkpoint_state_dict(path)
    else:
        raise ValueError(f"{path} is not a sharded checkpoint folder (kind {kind})")
    return _model_prefixed(state, path), _sharded_step(path, kind)


def load_weights_from(model: nn.Module, ckpt: str | os.PathLike, include: Sequence[str]) -> list[str]:
    """Copy the weights whose names match any regex in ``include`` from an earlier training run (``init_from``).

    Args:
        model: the model to update in place.
        ckpt: a Lightning checkpoint (file or sharded folder) of :class:`~aero_lightning.lit_module.AeroLitModule`
            or its run folder (``checkpoints/last.ckpt``).
        include: regexes over the checkpoint's parameter and buffer names (``"^encoder\\."``, ``"^ctc_head\\."``,
            ``"lora_"`` for a LoRA run's adapters).

    Names are paired across LoRA wrapping (:func:`~aero_lightning.model.lora.map_lora_names`): a plain
    ``<layer>.weight`` of a run without LoRA loads into ``<layer>.base_layer.weight`` of a model with LoRA on that
    layer, and a LoRA run's ``<layer>.base_layer.weight`` into a plain layer; adapters load into the same adapters.

    Returns:
        The model's names copied, sorted.

    Raises:
        FileNotFoundError: if ``ckpt`` does not exist.
        ValueError: if ``ckpt`` is not a training run's checkpoint, a pattern matches no weight of the checkpoint,
            a matching weight's shape differs, or the pattern selects LoRA adapters the model has no place for (a
            model built without the source run's ``model.lora``).
    """
    path = resolve_checkpoint(ckpt)
    kind = checkpoint_kind(path)
    if kind == "pretrained":
        raise ValueError(f"init_from needs a Lightning checkpoint of a training run, got the folder {path}")
    source, _ = sharded_model_weights(path) if kind in SHARDED_KINDS else lightning_model_weights(path)
    own = model.state_dict()
    patterns = [re.compile(p) for p in include]
    names = map_lora_names(list(source), list(own))
    chosen = [k for k in source if any(p.search(k) for p in patterns)]
    homeless = [k for k in chosen if k not in names and is_adapter_name(k)]
    if homeless:
        raise ValueError(
            f"init_from: {path} holds LoRA adapters ({homeless[:2]}, {len(homeless)} in all) that this model has no "
            "layer for: build it with the model.lora of that run (e.g. model/lora=llm), or leave the adapters out "
            "of init_from.include"
        )
    picked = {names[k]: source[k] for k in chosen if k in names}
    for p in patterns:
        if not any(p.search(k) for k in chosen if k in names):
            raise ValueError(f"init_from: {p.pattern!r} matches no weight of {path}")
    wrong = [k for k, v in picked.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"init_from: shapes differ for {wrong[:4]}: {path} was trained with another architecture"
        )
    model.load_state_dict(picked, strict=False)
    logger.info("init_from %s: copied %d tensors matching %s", path, len(picked), list(include))
    return sorted(picked)


# ------------------------------------------------------------------------------------- save / load


def save_pretrained(model: AeroModel, out_dir: str | os.PathLike) -> None:
    """Write ``encoder/``, ``llm/`` (with the tokenizer), ``projector.safetensors`` and ``aero_config.json``.

    The CTC head is a training aid and is not written. LoRA adapters are merged into the weights they adapt
    (:func:`~aero_lightning.model.lora.merged_state_dict`): the folder holds plain components.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.lora_layers:
        merged = merged_state_dict(model)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)}

        model.encoder.encoder.save_pretrained(out / "encoder", state_dict=part("encoder.encoder."))
        model.llm.save_pretrained(out / "llm", state_dict=part("llm."))
    else:
        model.encoder.encoder.save_pretrained(out / "encoder")
        model.llm.save_pretrained(out / "llm")
    model.tokenizer.save_pretrained(out / "llm")
    save_file(
        {k: v.contiguous() for k, v in model.projector.state_dict().items()},
        str(out / "projector.safetensors"),
    )
    config = {
        "projector": projector_spec(model.projector),
        "padding_free": model.encoder.padding_free,
        "end_of_turn_token": model.end_of_turn_token,
    }
    (out / "aero_config.json").write_text(json.dumps(config, indent=2))


def from_pretrained(path: str | os.PathLike, attn_implementation: str = "sdpa") -> AeroModel:
    """Load a folder written by :func:`save_pretrained`.

    Raises:
        FileNotFoundError: if ``aero_config.json`` is missing.
    """
    path = Path(path)
    cfg_file = path / "aero_config.json"
    if not cfg_file.exists():
        raise UserFileNotFoundError(
            f"{cfg_file} not found: {path} is not a folder written by save_pretrained"
        )
    cfg = json.loads(cfg_file.read_text())
    proj_cfg = dict(cfg["projector"])
    proj_cls = PROJECTORS[proj_cfg.pop("type")]

    def projector(encoder_dim: int, llm_dim: int) -> Projector:
        return proj_cls(encoder_dim=encoder_dim, llm_dim=llm_dim, **proj_cfg)

    model = build_aero_model(
        encoder={
            "name_or_path": str(path / "encoder"),
            "padding_free": cfg["padding_free"],
            "attn_implementation": attn_implementation,
        },
        llm={"name_or_path": str(path / "llm"), "attn_implementation": attn_implementation},
        projector=projector,
        end_of_turn_token=cfg.get("end_of_turn_token", "<|im_end|>"),
    )
    model.projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    return model


# -------------------------------------------------------------------------------- run model folders

RUN_MODEL_DIR = "model"
"""The folder of a training run (``<run>/model/``) that :func:`save_run_model` writes at the start of fit."""

RUN_MODEL_FILE = "aero_model.json"
"""The AeroModel settings inside :data:`RUN_MODEL_DIR`."""

RUN_MODEL_FORMAT = 1
"""Version of :data:`RUN_MODEL_FILE`'s layout."""


def _param_dtype(module: nn.Module) -> str | None:
    """Name of the dtype of ``module``'s first floating parameter (``"float32"``), None without one."""
    for p in module.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def save_run_model(model: AeroModel, out_dir: str | os.PathLike) -> Path:
    """Write everything that rebuilds ``model``'s architecture, but no weights, into ``out_dir`` (``<run>/model``).

    Layout::

        encoder/config.json         the audio encoder's transformers config (Whisper, HuBERT or wav2vec 2.0)
        llm/config.json             the LLM's config, its vocabulary already grown by the audio tokens
        llm/generation_config.json
        llm/tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   the tokenizer the model uses
        aero_model.json             encoder type and options, projector, end-of-turn token, CTC head, attention
                                    backends, parameter dtypes and the LoRA options (null without adapters)

    A Lightning checkpoint of the run holds every weight, so :func:`model_from_run_folder` plus the checkpoint
    restore the model without the encoder and LLM folders or hub ids the run started from, and without the data
    folders whose texts the demo tokenizer was trained on. The folder is written beside ``out_dir`` and then moved
    into place, so a reader never sees half of it, and several processes of one run may write it at once.

    Args:
        model: the model as training builds it (after :func:`ensure_audio_tokens`).
        out_dir: the folder to write; replaced if it exists.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: for an encoder or projector class this module cannot rebuild.
    """
    out = Path(out_dir)
    encoder = model.encoder
    if isinstance(encoder, WhisperAudioEncoder):
        enc_spec = {"type": "whisper", "padding_free": bool(encoder.padding_free)}
    elif isinstance(encoder, SSLAudioEncoder):
        enc_spec = {"type": encoder.encoder.config.model_type, "normalize": bool(encoder.normalize)}
    else:
        raise TypeError(f"cannot record an encoder of type {type(encoder).__name__}")
    enc_spec["attn_implementation"] = encoder.encoder.config._attn_implementation
    enc_spec["torch_dtype"] = _param_dtype(encoder)
    spec = {
        "format": RUN_MODEL_FORMAT,
        "encoder": enc_spec,
        "llm": {
            "attn_implementation": model.llm.config._attn_implementation,
            "torch_dtype": _param_dtype(model.llm),
        },
        "projector": projector_spec(model.projector),
        "projector_dtype": _param_dtype(model.projector),
        "end_of_turn_token": model.end_of_turn_token,
        "ctc_weight": model.ctc_weight,
        "ctc_only": model.ctc_only,
        "loss_chunk_tokens": model.loss_chunk_tokens,
        "lora": model.lora,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.encoder.config.save_pretrained(tmp / "encoder")
    model.llm.config.save_pretrained(tmp / "llm")
    model.llm.generation_config.save_pretrained(tmp / "llm")
    model.tokenizer.save_pretrained(tmp / "llm")
    (tmp / RUN_MODEL_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError:
        # another process of the same run moved its identical copy into place in between
        if not (out / RUN_MODEL_FILE).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def model_from_run_folder(folder: str | os.PathLike, attn_implementation: str | None = None) -> AeroModel:
    """Build the model that :func:`save_run_model` described, with random weights (LoRA adapters included).

    Nothing outside ``folder`` is read: the components are instantiated from their configs (random init) and the
    tokenizer is the folder's own. Load the weights from a checkpoint of the run afterwards (:func:`load_model`).

    Args:
        folder: a ``<run>/model`` folder.
        attn_implementation: attention backend of the LLM and of a Whisper encoder instead of the recorded ones
            (``varlen``, ``sdpa``, ...); HuBERT and wav2vec 2.0 encoders keep theirs, as in
            :func:`build_aero_model`.

    Returns:
        The :class:`AeroModel`, random-initialised, in training mode.

    Raises:
        FileNotFoundError: if ``folder`` has no :data:`RUN_MODEL_FILE` (a
            :class:`~aero_lightning.errors.UserError`).
        ValueError: for a newer layout version or an unknown encoder type.
    """
    folder = Path(folder)
    spec_file = folder / RUN_MODEL_FILE
    if not spec_file.is_file():
        raise UserFileNotFoundError(f"{spec_file} not found: {folder} is not a run's model folder")
    spec = json.loads(spec_file.read_text())
    if int(spec.get("format", 0)) > RUN_MODEL_FORMAT:
        raise ValueError(
            f"{spec_file} has format {spec['format']}; this aero_lightning reads up to {RUN_MODEL_FORMAT}"
        )
    enc = spec["encoder"]
    kind = enc["type"]
    enc_config = AutoConfig.from_pretrained(folder / "encoder")
    if kind == "whisper":
        whisper = PaddingFreeWhisperEncoder._from_config(
            enc_config,
            attn_implementation=attn_implementation or enc["attn_implementation"],
            dtype=_dtype(enc.get("torch_dtype")),
        )
        encoder: nn.Module = WhisperAudioEncoder(whisper, padding_free=enc["padding_free"])
    elif kind in SSL_TYPES:
        ssl = AutoModel.from_config(
            enc_config, attn_implementation=enc["attn_implementation"], dtype=_dtype(enc.get("torch_dtype"))
        )
        encoder = SSLAudioEncoder(ssl, normalize=enc["normalize"])
    else:
        raise ValueError(f"{spec_file}: unknown encoder type {kind!r} (known: {ENCODER_TYPES})")
    llm_spec = spec["llm"]
    llm = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(folder / "llm"),
        attn_implementation=attn_implementation or llm_spec["attn_implementation"],
        dtype=_dtype(llm_spec.get("torch_dtype")),
    )
    if (folder / "llm" / "generation_config.json").is_file():
        llm.generation_config = GenerationConfig.from_pretrained(folder / "llm")
    tokenizer = AutoTokenizer.from_pretrained(folder / "llm")
    ensure_audio_tokens(tokenizer, llm)  # the saved tokenizer has them: a no-op unless the folder was edited
    proj_cfg = dict(spec["projector"])
    projector = PROJECTORS[proj_cfg.pop("type")](
        encoder_dim=encoder.hidden_size, llm_dim=llm.config.hidden_size, **proj_cfg
    )
    if spec.get("projector_dtype"):
        projector = projector.to(_dtype(spec["projector_dtype"]))
    return AeroModel(
        encoder,
        projector,
        llm,
        tokenizer,
        end_of_turn_token=spec["end_of_turn_token"],
        ctc_weight=spec.get("ctc_weight", 0.0),
        loss_chunk_tokens=spec.get("loss_chunk_tokens", 4096),
        ctc_only=spec.get("ctc_only", False),
        lora=spec.get("lora"),
    )


def find_run_model(ckpt: Path, config: str | os.PathLike | None = None) -> Path | None:
    """The run's model folder (:data:`RUN_MODEL_DIR`) for a checkpoint, or None for a run written before it existed.

    Looked for next to ``config`` when given, then in the checkpoint's folder and the two above it (checkpoints
    live in ``<run>/checkpoints/``; a sharded checkpoint is a folder there).
    """
    places = [Path(config).parent] if config is not None else []
    places += [ckpt.parent, ckpt.parent.parent, ckpt.parent.parent.parent]
    for place in places:
        if (place / RUN_MODEL_DIR / RUN_MODEL_FILE).is_file():
            return place / RUN_MODEL_DIR
    return None


def _model_from_config(config_file: Path, attn_implementation: str | None) -> AeroModel:
    cfg = OmegaConf.load(config_file)
    if "model" not in cfg:
        raise UserValueError(f"{config_file} has no 'model' section; it is not a training run's config.yaml")
    model_cfg = cfg.model
    # inference: no Liger kernels, no activation checkpointing; every weight comes from the checkpoint, so the
    # run's init_from source need not exist any more
    for key, value in (("liger", False), ("gradient_checkpointing", False), ("init_from", None)):
        if key in model_cfg:
            model_cfg[key] = value
    if attn_implementation is not None:
        model_cfg.attn_implementation = attn_implementation
    return instantiate(model_cfg, _convert_="all")


def load_model(
    ckpt: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
) -> AeroModel:
    """Load an :class:`AeroModel` for inference (eval mode, no gradients).

    Args:
        ckpt: a Lightning ``.ckpt``, a sharded checkpoint folder (FSDP2 distributed checkpoint or DeepSpeed ZeRO,
            any stage; consolidated in memory by :func:`sharded_model_weights`), a run folder, or a
            ``save_pretrained`` folder (:func:`resolve_checkpoint`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; None = CUDA when available, else CPU.
        dtype: ``"float32"``, ``"bfloat16"``, ...; None keeps the loaded dtype (float32 for the demo).
        config: the run's ``config.yaml`` when the run folder is not next to the checkpoint; its folder is searched
            for the run's ``model/`` first.
        attn_implementation: override the run's attention backend (``varlen``, ``sdpa``, ...).

    Returns:
        The model on ``device``, in eval mode.

    Raises:
        FileNotFoundError, ValueError, ImportError: see :func:`resolve_checkpoint`, :func:`find_run_config`,
            :func:`model_from_run_folder` and :func:`sharded_model_weights`; a ``FileNotFoundError`` is a
            :class:`~aero_lightning.errors.UserError`.
        RuntimeError: if the checkpoint's weights do not fit the config's model (missing or unexpected keys).
    """
    path = resolve_checkpoint(ckpt)
    kind = checkpoint_kind(path)
    if kind == "pretrained":
        model = from_pretrained(path, attn_implementation=attn_implementation or "sdpa")
        source = f"save_pretrained folder {path}"
    else:
        run_model = find_run_model(path, config)
        if run_model is not None:
            model = model_from_run_folder(run_model, attn_implementation)
            built_from = f"model folder {run_model}"
        else:
            config_file = Path(config) if config is not None else find_run_config(path)
            logger.warning(
                "%s has no %s/ folder next to it (a run trained before runs carried their model settings): "
                "rebuilding the model from %s, which reads the encoder, the LLM and the tokenizer from the "
                "paths it names; if those folders changed since, the tokenizer may not be the one it was "
                "trained with",
                path,
                RUN_MODEL_DIR,
                config_file,
            )
            model = _model_from_config(config_file, attn_implementation)
            built_from = f"config {config_file}"
        if kind in SHARDED_KINDS:
            weights, step = sharded_model_weights(path)
        else:
            weights, step = lightning_model_weights(path)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{path} does not fit the model of {built_from}: missing {list(missing)[:8]} "
                f"(+{max(0, len(missing) - 8)}), unexpected {list(unexpected)[:8]} (+{max(0, len(unexpected) - 8)})"
            )
        source = f"checkpoint {path} (step {'?' if step is None else step}, {built_from})"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=torch.device(device))
    if dtype is not None:
        model = model.to(dtype=_dtype(dtype))
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded %s on %s", source, device)
    return model
