"""``automatic-speech-recognition`` pipeline of an exported Aero audio LLM (copied into the export folder).

Usage::

    from transformers import pipeline
    asr = pipeline("automatic-speech-recognition", model="EXPORT_DIR", trust_remote_code=True)
    asr("speech.flac")                                   # {"text": "..."}
    asr("speech.flac", num_beams=4, max_new_tokens=64)   # generation arguments pass through
    asr({"raw": waveform, "sampling_rate": 8000})        # arrays at any rate (resampled to 16 kHz)

Audio files are read with libsndfile (``soundfile``: WAV, FLAC, OGG, MP3, ...) and resampled with ``soxr``, as
aero_lightning's ``transcribe.py`` does, so both give the same text for the same file. Long recordings are not
chunked: every 30 s window goes through the encoder and the LLM reads all of them in one context. Without
``max_new_tokens`` the budget scales with the duration (``AeroConfig`` documents the formula). The pipeline
decodes one input at a time.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from transformers import Pipeline

from aero_lightning.data.chat import encode_chat

try:  # optional at import time (transformers checks the imports of remote code); needed to read files
    import soundfile
    import soxr
except ImportError:  # pragma: no cover - reported when a file is given
    soundfile = soxr = None

TARGET_RATE_HZ = 16000


def _resample(wave: np.ndarray, rate: int) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:  # (T, C) as soundfile returns it
        wave = wave.mean(axis=1, dtype=np.float32)
    if rate != TARGET_RATE_HZ and wave.size:
        if soxr is None:
            raise ImportError("resampling needs the 'soxr' package: pip install soxr")
        wave = soxr.resample(wave, rate, TARGET_RATE_HZ).astype(np.float32, copy=False)
    return np.ascontiguousarray(wave, dtype=np.float32)


def read_audio(inputs) -> np.ndarray:
    """A path, bytes, a 16 kHz array or ``{"raw"|"array": array, "sampling_rate": Hz}`` as 16 kHz mono float32.

    Raises:
        ValueError: if the input cannot be read as audio or holds no samples.
    """
    if isinstance(inputs, dict):
        wave = inputs.get("raw", inputs.get("array"))
        rate = inputs.get("sampling_rate")
        if wave is None or rate is None:
            raise ValueError("a dict input needs 'raw' (or 'array') and 'sampling_rate'")
        wave = _resample(wave, int(rate))
    elif isinstance(inputs, np.ndarray):
        wave = _resample(inputs, TARGET_RATE_HZ)
    elif isinstance(inputs, (str, os.PathLike, bytes, bytearray)):
        if soundfile is None:
            raise ImportError("reading audio files needs the 'soundfile' package: pip install soundfile")
        source = io.BytesIO(inputs) if isinstance(inputs, (bytes, bytearray)) else str(inputs)
        try:
            data, rate = soundfile.read(source, dtype="float32", always_2d=True)  # (T, C)
        except Exception as err:  # noqa: BLE001 - libsndfile raises several types
            name = "<bytes>" if isinstance(inputs, (bytes, bytearray)) else str(inputs)
            raise ValueError(f"{name}: not readable as audio ({type(err).__name__}: {err})") from err
        wave = _resample(data, int(rate))
    else:
        raise ValueError(f"unsupported input type {type(inputs).__name__}; give a path, bytes, array or dict")
    if wave.size == 0:
        raise ValueError("the audio holds no samples")
    return wave


class AeroASRPipeline(Pipeline):
    """Speech recognition with an exported Aero model: ``{"text": ...}`` per input."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = True
    _load_tokenizer = True

    def _sanitize_parameters(
        self, prompt=None, max_new_tokens=None, num_beams=None, generate_kwargs=None, **kwargs
    ):
        if kwargs:
            raise ValueError(
                f"unknown arguments {sorted(kwargs)}; pass generation arguments as generate_kwargs={{}}"
            )
        preprocess = {"prompt": prompt} if prompt is not None else {}
        forward = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            forward["max_new_tokens"] = int(max_new_tokens)
        if num_beams is not None:
            forward["num_beams"] = int(num_beams)
        return preprocess, forward, {}

    def preprocess(self, inputs, prompt: str | None = None) -> dict:
        wave = read_audio(inputs)
        features = self.feature_extractor(wave, sampling_rate=TARGET_RATE_HZ, return_tensors="pt")
        config = self.model.config
        messages = [
            {
                "role": "user",
                "content": [{"type": "audio"}, {"type": "text", "text": prompt or config.asr_prompt}],
            }
        ]
        encoded = encode_chat(
            self.tokenizer,
            messages,
            [int(features["num_audio_tokens"][0])],
            config.end_of_turn_token,
            add_generation_prompt=True,
        )
        input_ids = torch.tensor([encoded.input_ids], dtype=torch.long)  # (1, L)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "input_features": features["input_features"],
            "feature_lengths": features["feature_lengths"],
            "duration_s": torch.tensor([wave.size / TARGET_RATE_HZ]),
        }

    def _default_budget(self, duration_s: float) -> int:
        c = self.model.config
        scaled = c.base_new_tokens + math.ceil(duration_s * c.chars_per_second / c.chars_per_token)
        return int(min(c.max_new_tokens_cap, max(1, scaled)))

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        duration_s = float(model_inputs.pop("duration_s")[0])
        generate_kwargs.setdefault("max_new_tokens", self._default_budget(duration_s))
        tokens = self.model.generate(**model_inputs, **generate_kwargs)  # (1, T_new)
        return {"tokens": tokens}

    def postprocess(self, model_outputs: dict) -> dict:
        return {"text": self.tokenizer.decode(model_outputs["tokens"][0], skip_special_tokens=True).strip()}
