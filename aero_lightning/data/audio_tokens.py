"""The one place that knows how many frames and LLM tokens a clip becomes.

A clip of ``n`` samples at 16 kHz goes through these stages, each a ceiling division:

1. **windows**: cut into 30 s windows of ``WINDOW_SAMPLES = 480 000`` samples, the last one short
   (Whisper's input window; Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision",
   https://arxiv.org/abs/2212.04356, sec. 2.2);
2. **log-mel frames**: ``ceil(w / 160)`` per window of ``w`` samples (10 ms hop; 480 000 samples give 3000 frames,
   the centred frames of ``WhisperFeatureExtractor``);
3. **encoder frames**: ``ceil(T / 2)`` for ``T`` log-mel frames. Whisper's conv2 (kernel 3, stride 2, padding 1)
   gives ``floor((T - 1) / 2) + 1``, which is ``ceil(T / 2)``: 1500 frames (50 Hz) per full window. The HuBERT and
   wav2vec 2.0 adapters (:mod:`aero_lightning.model.ssl_encoders`) pad each window so that their conv stack
   (stride 320 samples) gives exactly this count too, so every encoder type shares it;
4. **audio tokens**: ``ceil(S / k)`` for ``S`` encoder frames and a projector that merges ``k`` frames (Aero's
   average pool: ``k = 2``, 25 tokens per second; tiny-audio's frame stacking: ``k = 5``).

The token count of a clip is the sum over its windows, and it depends only on the clip's length, so the data
pipeline budgets batches from the duration in a sample's JSON before any audio is decoded.

Every function accepts a Python ``int`` or an integer ``torch.Tensor`` of any shape and returns the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ENCODER_DOWNSAMPLE",
    "HOP_LENGTH",
    "SAMPLE_RATE_HZ",
    "WINDOW_FRAMES",
    "WINDOW_SAMPLES",
    "AudioTokenCounter",
    "ceil_div",
    "encoder_frames",
    "mel_frames",
    "samples_encoder_frames",
    "projected_tokens",
    "window_lengths",
]

SAMPLE_RATE_HZ = 16000
"""Sample rate of every waveform the model reads, in Hz."""
HOP_LENGTH = 160
"""Samples per log-mel frame (10 ms at 16 kHz)."""
WINDOW_SAMPLES = 480000
"""Samples per encoder window (30 s at 16 kHz)."""
WINDOW_FRAMES = 3000
"""Log-mel frames per full window (``WINDOW_SAMPLES / HOP_LENGTH``)."""
ENCODER_DOWNSAMPLE = 2
"""Log-mel frames per encoder frame (Whisper's stride-2 conv2)."""

IntOrTensor = int | torch.Tensor


def ceil_div(a: IntOrTensor, b: int) -> IntOrTensor:
    """``ceil(a / b)`` for non-negative integers, exactly (no float rounding).

    Args:
        a: an ``int`` or an integer tensor of any shape.
        b: a positive divisor.

    Returns:
        Same type and shape as ``a``.
    """
    if isinstance(a, torch.Tensor):
        return (a + (b - 1)) // b
    return -(-int(a) // b)


def window_lengths(num_samples: int, window_samples: int = WINDOW_SAMPLES) -> list[int]:
    """Samples in each 30 s window of a clip of ``num_samples`` samples (the last window may be short).

    Raises:
        ValueError: if ``num_samples < 1``.
    """
    if num_samples <= 0:
        raise ValueError(f"audio must have at least one sample, got {num_samples}")
    full, rest = divmod(int(num_samples), window_samples)
    return [window_samples] * full + ([rest] if rest else [])


def mel_frames(num_samples: IntOrTensor, hop_length: int = HOP_LENGTH) -> IntOrTensor:
    """Log-mel frames of a window of ``num_samples`` samples: ``ceil(num_samples / 160)`` (480 000 -> 3000)."""
    return ceil_div(num_samples, hop_length)


def encoder_frames(num_mel_frames: IntOrTensor, downsample: int = ENCODER_DOWNSAMPLE) -> IntOrTensor:
    """Encoder frames for ``num_mel_frames`` log-mel frames: ``ceil(T / 2)`` (3000 -> 1500, 50 Hz)."""
    return ceil_div(num_mel_frames, downsample)


def samples_encoder_frames(
    num_samples: IntOrTensor, hop_length: int = HOP_LENGTH, downsample: int = ENCODER_DOWNSAMPLE
) -> IntOrTensor:
    """Encoder frames of one window of ``num_samples`` samples: ``ceil(ceil(n / 160) / 2)``."""
    return encoder_frames(mel_frames(num_samples, hop_length), downsample)


def projected_tokens(num_encoder_frames: IntOrTensor, downsample: int) -> IntOrTensor:
    """LLM tokens a projector merging ``downsample`` frames makes of ``num_encoder_frames`` frames: ``ceil(S / k)``."""
    return ceil_div(num_encoder_frames, downsample)


@dataclass(frozen=True)
class AudioTokenCounter:
    """Number of LLM audio tokens for a clip, as a pure function of its length (picklable for data workers).

    Attributes:
        projector_downsample: encoder frames per LLM token (2 for Aero's average pool, ``k`` for frame stacking).
        encoder_downsample: log-mel frames per encoder frame (2 for Whisper's strided conv).
        window_samples: samples per window (480 000 = 30 s at 16 kHz).
        hop_length: samples per log-mel frame (160).
    """

    projector_downsample: int = 2
    encoder_downsample: int = ENCODER_DOWNSAMPLE
    window_samples: int = WINDOW_SAMPLES
    hop_length: int = HOP_LENGTH

    def window_lengths(self, num_samples: int) -> list[int]:
        """Samples in each window of a clip (see :func:`window_lengths`).

        Raises:
            ValueError: if ``num_samples < 1``.
        """
        return window_lengths(num_samples, self.window_samples)

    def encoder_frames(self, num_samples: IntOrTensor) -> IntOrTensor:
        """Encoder frames of windows of ``num_samples`` samples each (an int, or a ``(W,)`` tensor of lengths)."""
        return samples_encoder_frames(num_samples, self.hop_length, self.encoder_downsample)

    def tokens_per_window(self, window_samples: IntOrTensor) -> IntOrTensor:
        """LLM audio tokens of windows of ``window_samples`` samples each."""
        return projected_tokens(self.encoder_frames(window_samples), self.projector_downsample)

    def __call__(self, num_samples: int) -> int:
        """Audio tokens for a clip of ``num_samples`` samples at 16 kHz, summed over its windows.

        Raises:
            ValueError: if ``num_samples < 1``.
        """
        return sum(self.tokens_per_window(w) for w in self.window_lengths(num_samples))
