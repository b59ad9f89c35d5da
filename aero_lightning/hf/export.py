"""Export a trained model to a transformers folder that loads with ``trust_remote_code=True``.

``python -m aero_lightning.hf.export ckpt=PATH out=DIR [prompt=...] [dtype=bfloat16] [verify=true]``

The folder holds:

- ``model.safetensors`` (AeroModel's parameter names: ``encoder.encoder.*``, ``projector.*``, ``llm.*``; tied
  embeddings stored once) and ``config.json`` (:class:`AeroConfig`: nested encoder (Whisper, HuBERT or wav2vec 2.0)
  and LLM configs, projector, prompt, generation budget; ``auto_map`` and ``custom_pipelines`` for
  ``trust_remote_code``);
- the tokenizer (with its chat template and the audio special tokens), ``preprocessor_config.json``
  (:class:`AeroFeatureExtractor`: 30 s windows, then log-mel for Whisper or the normalised waveform for HuBERT and
  wav2vec 2.0, and the audio token count of aero_lightning/data/audio_tokens.py) and ``processor_config.json``
  (:class:`AeroProcessor`, what ``AutoProcessor`` loads: prompt + features for ``AutoModel``'s ``generate``);
- the model code: ``configuration_aero.py``, ``modeling_aero.py``, ``feature_extraction_aero.py``,
  ``processing_aero.py``, ``pipeline_aero.py`` and the aero_lightning modules they use (encoder adapters,
  projector, packed attention, log-mel, waveform normalisation, audio token count, chat prompt, repetition guard,
  chunking), copied with their ``aero_lightning`` imports made relative, so the folder needs only torch,
  transformers, numpy (and soundfile + soxr to read files);
- ``README.md`` with usage.

Then::

    from transformers import pipeline
    asr = pipeline("automatic-speech-recognition", model=DIR, trust_remote_code=True)
    asr("speech.wav")  # {"text": ...}; num_beams=..., max_new_tokens=... pass through to generate

With ``verify=true`` (default) the folder is loaded back with ``AutoModel.from_pretrained(DIR,
trust_remote_code=True)`` and its logits on a test clip are compared with the source model's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import aero_lightning
from aero_lightning.cli import run_key_value_cli
from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.eval.decode import GenerationOptions, chars_per_token
from aero_lightning.hf.configuration_aero import AeroConfig
from aero_lightning.hf.feature_extraction_aero import AeroFeatureExtractor
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.build import load_model
from aero_lightning.model.encoders import WhisperAudioEncoder
from aero_lightning.model.lora import merged_state_dict
from aero_lightning.model.projector import projector_spec
from aero_lightning.model.ssl_encoders import SSLAudioEncoder

logger = logging.getLogger(__name__)

__all__ = ["export", "feature_extractor_for", "main", "remote_code_files"]

PACKAGE_ROOT = Path(aero_lightning.__file__).resolve().parent
ENTRY_FILES = (
    "configuration_aero",
    "modeling_aero",
    "feature_extraction_aero",
    "processing_aero",
    "pipeline_aero",
)
"""Modules of ``aero_lightning/hf`` that form the remote code; their aero_lightning imports are followed."""

AUTO_MAP = {
    "AutoConfig": "configuration_aero.AeroConfig",
    "AutoModel": "modeling_aero.AeroForConditionalGeneration",
    "AutoProcessor": "processing_aero.AeroProcessor",
}
CUSTOM_PIPELINES = {
    "automatic-speech-recognition": {
        "impl": "pipeline_aero.AeroASRPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    }
}
_IMPORT = re.compile(r"^(\s*)from aero_lightning((?:\.\w+)+) import ", re.MULTILINE)
_BARE_IMPORT = re.compile(r"^\s*import aero_lightning", re.MULTILINE)

USAGE = """\
usage: python -m aero_lightning.hf.export ckpt=PATH out=DIR [key=value ...]

  ckpt=PATH        Lightning .ckpt (loaded through its run folder's model/), run folder, or save_pretrained folder
  out=DIR          export folder (must be empty or absent unless overwrite=true)
  config=PATH      a run's config.yaml when the checkpoint is not in its run folder (runs without model/)
  prompt=TEXT      ASR instruction the pipeline puts after the audio (default: the training prompt)
  dtype=NAME       weights dtype: float32 (default), bfloat16, float16
  verify=BOOL      load the folder back and compare logits with the source model (default true)
  overwrite=BOOL   replace an existing non-empty folder (default false)
"""


def _module_file(dotted: str) -> Path:
    return PACKAGE_ROOT.joinpath(*dotted.split(".")).with_suffix(".py")


def remote_code_files() -> dict[str, str]:
    """The remote-code files: ``{file name: source with relative imports}``.

    Starts from :data:`ENTRY_FILES` and follows every ``from aero_lightning.X.Y import`` line; each followed module
    is copied flat (``Y.py``) and the import becomes ``from .Y import``.

    Raises:
        ValueError: on ``import aero_lightning`` (not rewritable) or two modules with the same file name.
    """
    pending = [f"hf.{name}" for name in ENTRY_FILES]
    seen: dict[str, str] = {}
    files: dict[str, str] = {}
    while pending:
        dotted = pending.pop()
        name = dotted.rsplit(".", 1)[-1]
        if name in seen:
            if seen[name] != dotted:
                raise ValueError(f"two remote-code modules named {name}.py: {seen[name]} and {dotted}")
            continue
        seen[name] = dotted
        source = _module_file(dotted).read_text(encoding="utf-8")
        if _BARE_IMPORT.search(source):
            raise ValueError(
                f"aero_lightning/{dotted}.py uses 'import aero_lightning...'; use 'from ... import'"
            )
        for match in _IMPORT.finditer(source):
            pending.append(match.group(2).lstrip("."))
        files[f"{name}.py"] = _IMPORT.sub(
            lambda m: f"{m.group(1)}from .{m.group(2).rsplit('.', 1)[-1]} import ", source
        )
    return files


def _weights(model: AeroModel, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """AeroModel's inference weights (no CTC head), tied LLM weights stored once, LoRA adapters merged into the
    weights they adapt (:func:`~aero_lightning.model.lora.merged_state_dict`: plain names, no peft to load)."""
    tied = {f"llm.{k}" for k in getattr(model.llm, "all_tied_weights_keys", {}) or {}}
    out = {}
    for name, tensor in merged_state_dict(model).items():
        if name.startswith("ctc_head.") or name in tied:
            continue
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def build_config(
    model: AeroModel, prompt: str, options: GenerationOptions, dtype: torch.dtype | None
) -> AeroConfig:
    """:class:`AeroConfig` describing ``model`` (architecture, prompt, generation budget, remote-code maps)."""
    tok = model.tokenizer
    stops = [model.end_of_turn_id] + [
        t for t in [tok.eos_token_id] if t is not None and t != model.end_of_turn_id
    ]
    text_config = model.llm.config.to_dict()
    text_config.pop("_name_or_path", None)
    encoder_config = model.encoder.config.to_dict()
    encoder_config.pop("_name_or_path", None)
    config = AeroConfig(
        encoder_config=encoder_config,
        text_config=text_config,
        projector=projector_spec(model.projector),
        padding_free=bool(getattr(model.encoder, "padding_free", True)),
        encoder_attn_implementation=model.encoder.config._attn_implementation or "sdpa",
        end_of_turn_token=model.end_of_turn_token,
        audio_token_id=int(model.audio_token_id),
        stop_token_ids=[int(s) for s in stops],
        generation_pad_token_id=int(tok.pad_token_id if tok.pad_token_id is not None else stops[0]),
        llm_generation_config=model.llm.generation_config.to_diff_dict(),
        asr_prompt=prompt,
        base_new_tokens=options.base_new_tokens,
        chars_per_second=options.chars_per_second,
        chars_per_token=chars_per_token(tok),
        max_new_tokens_cap=options.max_new_tokens_cap,
        repetition_guard=options.repetition_guard.to_dict() if options.repetition_guard is not None else None,
        max_pass_s=options.max_pass_s,
        chunk_s=options.chunk_s,
        stride_s=options.stride_s,
    )
    config.architectures = ["AeroForConditionalGeneration"]
    config.auto_map = dict(AUTO_MAP)
    config.custom_pipelines = json.loads(json.dumps(CUSTOM_PIPELINES))
    config.dtype = dtype or next(model.parameters()).dtype
    return config


def feature_extractor_for(model: AeroModel) -> AeroFeatureExtractor:
    """The export's feature extractor: the encoder input ``model`` computes, and its audio token count.

    Whisper encoders get log-mel (``num_mel_bins``, and the 30 s padding's frames when ``padding_free`` is off);
    HuBERT / wav2vec 2.0 encoders get the waveform, normalised when the encoder normalises (``normalize``), which
    the exported encoder then leaves to the extractor.
    """
    counts = {
        "encoder_downsample": model.audio_token_counter().encoder_downsample,
        "projector_downsample": model.projector.downsample,
    }
    if isinstance(model.encoder, SSLAudioEncoder):
        return AeroFeatureExtractor(feature_type="waveform", do_normalize=model.encoder.normalize, **counts)
    return AeroFeatureExtractor(
        num_mel_bins=model.encoder.num_mel_bins, pad_to_window=not model.encoder.padding_free, **counts
    )


def _encoder_description(model: AeroModel) -> str:
    if isinstance(model.encoder, SSLAudioEncoder):
        kind = {"hubert": "HuBERT", "wav2vec2": "wav2vec 2.0"}[model.encoder.encoder.config.model_type]
        return f"{kind} encoder (30 s windows of the normalised waveform, 50 frames per second)"
    return "Whisper-architecture encoder (padding-free 30 s windows)"


def _write_readme(out: Path, prompt: str, encoder: str) -> None:
    (out / "README.md").write_text(
        "---\nlibrary_name: transformers\npipeline_tag: automatic-speech-recognition\n---\n\n"
        "# Aero audio LLM (exported by aero_lightning)\n\n"
        f"{encoder} -> projector -> causal LM. A recording goes into "
        "one LLM context up to what a pass holds (the LLM's context, at most `max_pass_s` in config.json); longer "
        "ones are transcribed in overlapping chunks (`chunk_length_s`, `stride_length_s`). A repetition guard "
        "stops a reply that loops.\n\n"
        "```python\nfrom transformers import pipeline\n\n"
        'asr = pipeline("automatic-speech-recognition", model="PATH_TO_THIS_FOLDER", trust_remote_code=True)\n'
        'print(asr("speech.wav")["text"])\n'
        'print(asr("speech.wav", num_beams=4, max_new_tokens=128)["text"])\n'
        'print(asr("meeting.wav", chunk_length_s=60, stride_length_s=5)["text"])\n```\n\n'
        "Direct use (the processor builds the prompt with its audio slots and the features):\n\n"
        "```python\nfrom transformers import AutoModel, AutoProcessor\n\n"
        'model = AutoModel.from_pretrained("PATH_TO_THIS_FOLDER", trust_remote_code=True)\n'
        'processor = AutoProcessor.from_pretrained("PATH_TO_THIS_FOLDER", trust_remote_code=True)\n'
        'inputs = processor(audio="speech.wav")\n'
        "tokens = model.generate(**inputs, max_new_tokens=128)\n"
        "print(processor.batch_decode(tokens, skip_special_tokens=True)[0].strip())\n```\n\n"
        f"ASR prompt: `{prompt}`. Needs torch, transformers, numpy; soundfile and soxr to read and resample files.\n",
        encoding="utf-8",
    )


def _verify(model: AeroModel, out: Path, atol: float = 1e-4) -> float:
    """Load ``out`` with ``AutoModel`` (remote code) and compare logits with ``model`` on a 3 s test clip.

    Returns:
        The largest absolute logit difference.

    Raises:
        RuntimeError: if it exceeds ``atol``.
    """
    from transformers import AutoFeatureExtractor, AutoModel

    from aero_lightning.data.chat import encode_chat
    from aero_lightning.eval.decode import user_messages

    loaded = AutoModel.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    fe = AutoFeatureExtractor.from_pretrained(str(out), trust_remote_code=True)
    generator = torch.Generator().manual_seed(0)
    wave = (0.1 * torch.randn(48_000, generator=generator)).numpy()  # 3 s
    feats = fe(wave, sampling_rate=16_000)
    if int(feats["num_audio_tokens"][0]) != model.audio_token_counter()(len(wave)):
        raise RuntimeError("the exported feature extractor counts audio tokens differently from the model")
    enc = encode_chat(
        model.tokenizer, user_messages(loaded.config.asr_prompt), [int(feats["num_audio_tokens"][0])],
        model.end_of_turn_token, add_generation_prompt=True,
    )  # fmt: skip
    ids = torch.tensor([enc.input_ids])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the export is an inference model: no dropout (LoRA's included) in the reference either
    with torch.no_grad():
        ref = (
            model(
                input_ids=ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                input_features=feats["input_features"].to(device, next(model.encoder.parameters()).dtype),
                feature_lengths=feats["feature_lengths"].to(device),
            )
            .logits.float()
            .cpu()
        )
        got = loaded(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=feats["input_features"],
            feature_lengths=feats["feature_lengths"],
        ).logits.float()
    model.train(was_training)
    diff = float((ref - got).abs().max())
    if diff > atol:
        raise RuntimeError(f"exported model's logits differ from the source model's by {diff:.3g} (> {atol})")
    return diff


def export(
    ckpt: str | os.PathLike | AeroModel,
    out: str | os.PathLike,
    prompt: str = DEFAULT_ASR_PROMPT,
    dtype: str | None = None,
    config: str | os.PathLike | None = None,
    generation: GenerationOptions | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a transformers folder for a checkpoint (module docstring).

    Args:
        ckpt: a Lightning ``.ckpt``, a run folder, a ``save_pretrained`` folder, or a loaded :class:`AeroModel`.
        out: the export folder.
        prompt: ASR instruction the pipeline uses.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``); None keeps the model's.
        config: the run's ``config.yaml`` when it is not next to the checkpoint.
        generation: budget settings stored for the pipeline (defaults of :class:`GenerationOptions`).
        verify: reload the folder and compare logits with the source (float32 weights only).
        overwrite: replace a non-empty ``out``.

    Returns:
        ``out`` as a Path.

    Raises:
        FileExistsError: if ``out`` is not empty and ``overwrite`` is false.
        NotImplementedError: for an encoder other than Whisper, HuBERT and wav2vec 2.0.
        RuntimeError: if verification fails.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=true to replace it")
        shutil.rmtree(out)
    model = ckpt if isinstance(ckpt, AeroModel) else load_model(ckpt, device="cpu", config=config)
    if not isinstance(model.encoder, (WhisperAudioEncoder, SSLAudioEncoder)):
        raise NotImplementedError(
            "export supports Whisper, HuBERT and wav2vec 2.0 encoders; this model's encoder is "
            f"{type(model.encoder).__name__}"
        )
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    options = generation or GenerationOptions()
    out.mkdir(parents=True, exist_ok=True)
    for name, source in remote_code_files().items():
        (out / name).write_text(source, encoding="utf-8")
    save_file(_weights(model, torch_dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = build_config(model, prompt, options, torch_dtype)
    cfg.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    feature_extractor_for(model).save_pretrained(out)
    pre = out / "preprocessor_config.json"
    pre_cfg = json.loads(pre.read_text())
    pre_cfg["auto_map"] = {"AutoFeatureExtractor": "feature_extraction_aero.AeroFeatureExtractor"}
    pre.write_text(json.dumps(pre_cfg, indent=2, sort_keys=True) + "\n")
    processor = {
        "processor_class": "AeroProcessor",
        "auto_map": {"AutoProcessor": "processing_aero.AeroProcessor"},
        "asr_prompt": prompt,
        "end_of_turn_token": model.end_of_turn_token,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    _write_readme(out, prompt, _encoder_description(model))
    logger.info(
        "exported %s to %s", getattr(ckpt, "name", ckpt) if not isinstance(ckpt, AeroModel) else "model", out
    )
    if verify:
        if torch_dtype not in (None, torch.float32):
            logger.info("verify skipped: the export is %s, the comparison needs float32 weights", dtype)
        else:
            diff = _verify(model, out)
            logger.info("verified: exported logits match the source model (max |diff| %.2e)", diff)
    return out


def _parse(argv: Sequence[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {arg!r}")
        if key in kwargs:
            raise ValueError(f"{key} given twice")
        if key in ("verify", "overwrite"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            kwargs[key] = value.lower() in ("true", "1", "yes")
        elif key in ("ckpt", "out", "prompt", "dtype", "config"):
            kwargs[key] = value
        else:
            raise ValueError(f"unknown key {key!r}")
    for required in ("ckpt", "out"):
        if required not in kwargs:
            raise ValueError(f"{required}= is required")
    return kwargs


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point (:data:`USAGE`); exits with status 2 on bad arguments."""
    return run_key_value_cli(argv, USAGE, _parse, export)


if __name__ == "__main__":
    main()
