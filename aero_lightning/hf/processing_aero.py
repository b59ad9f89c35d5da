"""Processor of an exported Aero audio LLM (copied into the export folder as remote code).

``AutoProcessor.from_pretrained(EXPORT_DIR, trust_remote_code=True)`` returns an :class:`AeroProcessor`: the
feature extractor (30 s windows, then log-mel or the normalised waveform) and the tokenizer together, turning audio
(and an optional instruction) into exactly the inputs ``AutoModel``'s ``generate`` takes::

    processor = AutoProcessor.from_pretrained(EXPORT_DIR, trust_remote_code=True)
    model = AutoModel.from_pretrained(EXPORT_DIR, trust_remote_code=True)
    inputs = processor(audio="speech.flac")              # a path, bytes, or an array with sampling_rate=...
    tokens = model.generate(**inputs, max_new_tokens=128)
    print(processor.batch_decode(tokens, skip_special_tokens=True)[0].strip())

The prompt is the one the model was trained with: a user turn holding the audio, as ``<|audio_bos|>`` + N x
``<|AUDIO|>`` + ``<|audio_eos|>`` with N the clip's number of projected audio embeddings, followed by the instruction
(the export's ASR prompt by default), rendered by the tokenizer's chat template with the assistant turn opened.
Audio files are read with libsndfile (``soundfile``) and resampled to 16 kHz mono with ``soxr``, as
aero_lightning's ``transcribe.py`` does, so direct use, the pipeline and ``transcribe.py`` see the same features.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT, encode_chat

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


def read_audio(inputs, sampling_rate: int | None = None) -> np.ndarray:
    """One clip as 16 kHz mono float32.

    Args:
        inputs: a path, the file's bytes, an array (``(T,)`` or ``(T, C)``) or ``{"raw"|"array": array,
            "sampling_rate": Hz}``.
        sampling_rate: the rate of an array input in Hz (default 16 000).

    Returns:
        ``(T',)`` float32 at 16 kHz.

    Raises:
        ValueError: if the input cannot be read as audio or holds no samples.
    """
    if isinstance(inputs, dict):
        wave = inputs.get("raw", inputs.get("array"))
        rate = inputs.get("sampling_rate")
        if wave is None or rate is None:
            raise ValueError("a dict input needs 'raw' (or 'array') and 'sampling_rate'")
        wave = _resample(wave, int(rate))
    elif isinstance(inputs, (np.ndarray, torch.Tensor)):
        wave = _resample(np.asarray(inputs), int(sampling_rate or TARGET_RATE_HZ))
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


class AeroProcessor(ProcessorMixin):
    """Prompt + features for :class:`AeroForConditionalGeneration` (module docstring).

    Args:
        feature_extractor: the export's :class:`AeroFeatureExtractor`.
        tokenizer: the LLM's tokenizer (chat template and audio special tokens).
        asr_prompt: the instruction used when no ``text`` is given.
        end_of_turn_token: the chat template's end-of-turn token.
        chat_template: unused (the tokenizer's own template renders the chat); kept for ``ProcessorMixin``.
    """

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        asr_prompt: str = DEFAULT_ASR_PROMPT,
        end_of_turn_token: str = "<|im_end|>",
        chat_template=None,
    ):
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)
        self.asr_prompt = asr_prompt
        self.end_of_turn_token = end_of_turn_token

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "feature_lengths"]

    def __call__(
        self, audio=None, text=None, sampling_rate: int | None = None, return_tensors: str = "pt", **kwargs
    ) -> BatchFeature:
        """Model inputs for one clip or a batch of clips.

        Args:
            audio: a clip or a list of clips; each a path, bytes, an array or ``{"raw", "sampling_rate"}``
                (:func:`read_audio`).
            text: the instruction after the audio: one string for all clips, one per clip, or None for the
                export's ASR prompt.
            sampling_rate: the rate of array clips in Hz (default 16 000); files carry their own.
            return_tensors: ``"pt"``.

        Returns:
            ``BatchFeature`` with ``input_ids (B, L)`` left-padded and ``attention_mask (B, L)``, ``input_features``
            and ``feature_lengths (W,)`` of every clip's 30 s windows in clip order (``(W, num_mel_bins, T)`` log-mel
            for a Whisper encoder, ``(W, N)`` normalised waveforms for HuBERT / wav2vec 2.0; see the feature
            extractor): the keyword arguments of the model's ``forward`` and ``generate``.

        Raises:
            ValueError: without audio, for a prompt count that does not match, or for unreadable audio.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if audio is None:
            raise ValueError("AeroProcessor needs audio (a path, bytes, an array or a list of them)")
        single = not isinstance(audio, (list, tuple))
        clips = [audio] if single else list(audio)
        waves = [read_audio(c, sampling_rate) for c in clips]
        prompts = [text] * len(waves) if text is None or isinstance(text, str) else list(text)
        if len(prompts) != len(waves):
            raise ValueError(f"{len(prompts)} prompts for {len(waves)} clips")
        features = self.feature_extractor(waves, sampling_rate=TARGET_RATE_HZ, return_tensors="pt")
        rows = []
        for prompt, slots in zip(prompts, features["num_audio_tokens"].tolist()):
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "audio"}, {"type": "text", "text": prompt or self.asr_prompt}],
                }
            ]
            rows.append(
                encode_chat(
                    self.tokenizer, messages, [int(slots)], self.end_of_turn_token, add_generation_prompt=True
                ).input_ids
            )
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], dtype=torch.long)  # (B, L)
        attention_mask = torch.tensor(
            [[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=torch.long
        )
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": features["input_features"],
            "feature_lengths": features["feature_lengths"],
        }
        return BatchFeature(data, tensor_type=return_tensors)
