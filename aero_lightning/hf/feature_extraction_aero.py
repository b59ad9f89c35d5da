"""Feature extractor of an exported Aero audio LLM (copied into the export folder as remote code).

Cuts each 16 kHz mono clip into 30 s windows (the last one short) and gives the encoder's input per window:

- ``feature_type="log_mel"`` (Whisper encoders): Whisper log-mel on the window's true length with the same
  :class:`LogMelSpectrogram` the training code uses (equal to ``WhisperFeatureExtractor`` on every valid frame);
- ``feature_type="waveform"`` (HuBERT, wav2vec 2.0): the raw waveform, normalised per window to zero mean and unit
  variance as ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does, with the training code's own
  :func:`~aero_lightning.model.ssl_encoders.normalize_windows`.

Each clip's ``<|AUDIO|>`` slots are counted with the training code's
:class:`~aero_lightning.data.audio_tokens.AudioTokenCounter` (the same count for every encoder type).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin

from aero_lightning.data.audio_tokens import SAMPLE_RATE_HZ, WINDOW_SAMPLES, AudioTokenCounter
from aero_lightning.data.features import LogMelSpectrogram
from aero_lightning.model.ssl_encoders import normalize_windows

FEATURE_TYPES = ("log_mel", "waveform")


class AeroFeatureExtractor(FeatureExtractionMixin):
    """Windows + log-mel (or normalised waveforms) for :class:`AeroForConditionalGeneration`.

    Args:
        num_mel_bins: mel bins of a Whisper encoder (80 or 128); unused for waveforms.
        encoder_downsample: log-mel frames per encoder frame (2: Whisper's stride-2 conv; HuBERT and wav2vec 2.0
            adapters give the same frame count).
        projector_downsample: encoder frames per LLM token (the projector's stack or pool factor).
        sampling_rate: expected input rate in Hz (16 000).
        window_samples: samples per encoder window (480 000 = 30 s).
        pad_to_window: also give each window the log-mel of its zero padding up to 30 s, as
            ``WhisperFeatureExtractor`` does, for a model exported with ``padding_free: false``.
        feature_type: ``"log_mel"`` (Whisper) or ``"waveform"`` (HuBERT, wav2vec 2.0); module docstring.
        do_normalize: normalise each waveform window to zero mean and unit variance (``feature_type="waveform"``
            only; the training encoder's ``normalize``).

    Raises:
        ValueError: for an unknown ``feature_type``.
    """

    model_input_names = ["input_features", "feature_lengths"]

    def __init__(
        self,
        num_mel_bins: int = 80,
        encoder_downsample: int = 2,
        projector_downsample: int = 2,
        sampling_rate: int = SAMPLE_RATE_HZ,
        window_samples: int = WINDOW_SAMPLES,
        pad_to_window: bool = False,
        feature_type: str = "log_mel",
        do_normalize: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if feature_type not in FEATURE_TYPES:
            raise ValueError(f"feature_type must be one of {FEATURE_TYPES}, got {feature_type!r}")
        self.feature_type = feature_type
        self.do_normalize = bool(do_normalize)
        self.num_mel_bins = int(num_mel_bins)
        self.encoder_downsample = int(encoder_downsample)
        self.projector_downsample = int(projector_downsample)
        self.sampling_rate = int(sampling_rate)
        self.window_samples = int(window_samples)
        self.pad_to_window = bool(pad_to_window)
        self._log_mel = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("_log_mel", None)
        return out

    @property
    def counter(self) -> AudioTokenCounter:
        """The training code's audio token count for this extractor's settings."""
        return AudioTokenCounter(
            projector_downsample=self.projector_downsample,
            encoder_downsample=self.encoder_downsample,
            window_samples=self.window_samples,
        )

    def window_lengths(self, num_samples: int) -> list[int]:
        """Samples in each 30 s window of a clip (the last may be short).

        Raises:
            ValueError: if ``num_samples < 1``.
        """
        return self.counter.window_lengths(num_samples)

    def num_audio_tokens(self, num_samples: int) -> int:
        """``<|AUDIO|>`` slots of a clip of ``num_samples`` samples."""
        return self.counter(num_samples)

    def __call__(self, raw_speech, sampling_rate: int | None = None, return_tensors: str = "pt", **kwargs):
        """Encoder inputs of the windows of one clip or a list of clips.

        Args:
            raw_speech: a ``(T,)`` float array or a list of them, 16 kHz mono.
            sampling_rate: must be 16 000 when given (resample first).

        Returns:
            ``BatchFeature`` with ``input_features`` float32, ``feature_lengths (W,)``, ``windows_per_clip (B,)``
            and ``num_audio_tokens (B,)``; windows are in clip order. ``input_features`` is ``(W, num_mel_bins,
            T_max)`` log-mel with ``feature_lengths`` valid frames, or for ``feature_type="waveform"`` ``(W,
            N_max)`` waveforms (zero past each window's end) with ``feature_lengths`` valid samples.

        Raises:
            ValueError: on another sampling rate or an empty clip.
        """
        if sampling_rate is not None and int(sampling_rate) != self.sampling_rate:
            raise ValueError(
                f"expected {self.sampling_rate} Hz audio, got {sampling_rate} Hz; resample it first"
            )
        clips = (
            [raw_speech] if isinstance(raw_speech, np.ndarray) and raw_speech.ndim == 1 else list(raw_speech)
        )
        windows, per_clip, tokens = [], [], []
        for clip in clips:
            wave = np.asarray(clip, dtype=np.float32)
            if wave.ndim != 1 or wave.size == 0:
                raise ValueError(f"each clip must be a non-empty (T,) waveform, got shape {wave.shape}")
            start = 0
            lengths = self.window_lengths(wave.size)
            for n in lengths:
                windows.append(wave[start : start + n])
                start += n
            per_clip.append(len(lengths))
            tokens.append(self.num_audio_tokens(wave.size))
        lengths = torch.tensor([len(w) for w in windows], dtype=torch.long)  # (W,)
        audio = torch.zeros((len(windows), int(lengths.max())), dtype=torch.float32)  # (W, N)
        for i, w in enumerate(windows):
            audio[i, : len(w)] = torch.from_numpy(np.ascontiguousarray(w))
        if self.feature_type == "waveform":
            features = normalize_windows(audio, lengths) if self.do_normalize else audio  # (W, N)
            feature_lengths = lengths
        else:
            features, feature_lengths = self._log_mel_features(audio, lengths)  # (W, n_mels, T), (W,)
        data = {
            "input_features": features,
            "feature_lengths": feature_lengths,
            "windows_per_clip": torch.tensor(per_clip, dtype=torch.long),
            "num_audio_tokens": torch.tensor(tokens, dtype=torch.long),
        }
        return BatchFeature(data, tensor_type=return_tensors)

    def _log_mel_features(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel ``(W, n_mels, T)`` and valid frames ``(W,)`` of ``(W, N)`` windows of ``(W,)`` samples."""
        if self._log_mel is None:
            self._log_mel = LogMelSpectrogram(
                num_mel_bins=self.num_mel_bins, pad_to_window=self.pad_to_window
            )
        return self._log_mel(audio, lengths)
