"""Whisper log-mel features computed on the accelerator, in batch.

CPU data workers only decode and resample to 16 kHz; the padded waveform batch travels to the device and
:class:`LogMelSpectrogram` turns it into the log-mel input of a Whisper encoder there.

The computation reproduces ``transformers.WhisperFeatureExtractor`` (its torch path) numerically, which in turn
follows Whisper's ``log_mel_spectrogram`` (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak
Supervision", section 2.2, and ``whisper/audio.py``): 25 ms Hann window, 10 ms hop, power spectrum, Slaney mel
filters over 0-8 kHz, ``log10(max(mel, 1e-10))``, floored at 8 (log10 units) below the clip's maximum, then
``(x + 4) / 4``.

Padding-free windows: the HF extractor zero-pads every clip to 30 s, so frames near the true end of a short clip
see zeros, and its per-clip maximum spans all 3000 frames. Here each row keeps only its own frames, and the
signal each row sees is exactly the one HF would build (audio, zeros up to 30 s, reflect padding at both ends
of the 30 s buffer), so every valid frame and the per-row maximum match HF. The maximum includes the one or
two frames after the last valid one whose windows still overlap the audio, as HF's does (a loud click in the
last samples would otherwise shift the floor). Clips longer than 30 s, which HF truncates, are treated as a
buffer of their own length (reflect padding at their end).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.audio_utils import mel_filter_bank

from aero_lightning.data.audio_tokens import (
    HOP_LENGTH,
    SAMPLE_RATE_HZ,
    WINDOW_FRAMES,
    WINDOW_SAMPLES,
    mel_frames,
)

__all__ = [
    "HOP_LENGTH",
    "N_FFT",
    "SAMPLE_RATE_HZ",
    "WINDOW_FRAMES",
    "WINDOW_SAMPLES",
    "LogMelSpectrogram",
    "num_frames",
    "pcm_windows",
]

N_FFT = 400  # 25 ms analysis window
num_frames = mel_frames
"""Log-mel frames of a clip (:func:`aero_lightning.data.audio_tokens.mel_frames`, 480 000 samples -> 3000):
the HF extractor's frames centred inside the clip (it computes ``len // HOP_LENGTH + 1`` frames of a centred STFT
and drops the last one)."""

_HALF = N_FFT // 2  # reflect padding of the centred STFT at each end, in samples


def pcm_windows(audio_pcm: Tensor, window_lengths: Tensor) -> Tensor:
    """Float windows from the batch's 16-bit PCM, on its device (log-mel and the encoders run in float32 there).

    Args:
        audio_pcm: ``(S,)`` int16 samples of all windows back to back (:mod:`aero_lightning.data.packing`).
        window_lengths: ``(W,)`` samples per window, summing to ``S``.

    Returns:
        ``(W, N)`` float32 waveforms in [-1, 1) (``int16 / 32768``), zero-padded to the longest window ``N``.

    Raises:
        ValueError: if the lengths do not add up to the samples given, or ``audio_pcm`` is not int16.
    """
    if audio_pcm.dtype != torch.int16:
        raise ValueError(f"audio_pcm must be int16 PCM, got {audio_pcm.dtype}")
    lengths = window_lengths.tolist()
    if sum(lengths) != audio_pcm.shape[0]:
        raise ValueError(
            f"window_lengths sum to {sum(lengths)} samples but audio_pcm holds {audio_pcm.shape[0]}"
        )
    windows = nn.utils.rnn.pad_sequence(list(audio_pcm.split(lengths)), batch_first=True)  # (W, N) int16
    return windows.float() / 32768.0


class LogMelSpectrogram(nn.Module):
    """Batched Whisper log-mel spectrogram, equal to ``transformers.WhisperFeatureExtractor``.

    The mel filters and the Hann window are non-persistent float32 buffers: ``.to(device)`` moves them, dtype
    casts of the module leave them float32, and they are not saved in checkpoints.

    Args:
        num_mel_bins: Mel bins: 80 (Whisper up to large-v2) or 128 (large-v3).
        pad_to_window: also return the frames of the zero padding up to 30 s, with the values HF's extractor gives
            them (the floor of ``max - 8`` in log10 units and the frames that overlap the clip's end), for encoders
            that run on exactly 3000 frames (``padding_free: false``). False: only each clip's own frames.
    """

    def __init__(self, num_mel_bins: int = 80, pad_to_window: bool = False) -> None:
        super().__init__()
        self.num_mel_bins = num_mel_bins
        self.pad_to_window = bool(pad_to_window)
        # Same call as WhisperFeatureExtractor.__init__.
        filters = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2,
            num_mel_filters=num_mel_bins,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=SAMPLE_RATE_HZ,
            norm="slaney",
            mel_scale="slaney",
        )  # (N_FFT // 2 + 1, n_mels)
        self.register_buffer(
            "mel_filters", torch.from_numpy(filters.T).float().contiguous(), persistent=False
        )
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # Follow device moves but keep the float32 filters and window: a dtype cast of the whole model
        # (e.g. bf16-true precision) must not round them.
        mel_filters, window = self.mel_filters, self.window
        out = super()._apply(fn, recurse)
        self.mel_filters = mel_filters.to(self.mel_filters.device)
        self.window = window.to(self.window.device)
        return out

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Compute log-mel features of a padded waveform batch.

        Args:
            waveforms: ``(B, N)`` mono audio at 16 kHz, any float dtype (computed in float32); samples at or beyond
                a row's length are ignored.
            lengths: ``(B,)`` integer count of valid samples per row, each ``<= N``.

        Returns:
            ``features``: ``(B, n_mels, T)`` float32 log-mel, ``T = num_frames(max(lengths))`` (at least 3000 with
            ``pad_to_window``); frames at or beyond a row's frame length are 0.0 (with ``pad_to_window``, frames
            up to 3000 hold the 30 s padding's log-mel, as in ``WhisperFeatureExtractor``).
            ``frame_lengths``: ``(B,)`` int64 valid frames per row, ``num_frames(lengths)``.

        Raises:
            ValueError: If the batch is empty, the shapes disagree or a length exceeds ``N``.
        """
        if waveforms.dim() != 2 or lengths.shape != waveforms.shape[:1]:
            raise ValueError(
                f"expected waveforms (B, N) and lengths (B,), got {tuple(waveforms.shape)} and {tuple(lengths.shape)}"
            )
        if waveforms.shape[0] == 0:
            raise ValueError("empty batch")
        device = waveforms.device
        lengths = lengths.to(device=device, dtype=torch.long)
        max_len = int(lengths.max())
        if max_len > waveforms.shape[1]:
            raise ValueError(f"a length ({max_len}) exceeds the waveform width ({waveforms.shape[1]})")
        frame_lengths = num_frames(lengths)  # (B,)
        num_out = num_frames(max_len)
        if self.pad_to_window:
            num_out = max(num_out, WINDOW_FRAMES)

        # HF's signal for row i: audio, zeros up to padded_i = max(length_i, 30 s), reflect-padded by N_FFT // 2
        # at both ends (torch.stft center=True on the padded clip).
        padded = lengths.clamp(min=WINDOW_SAMPLES)  # (B,)
        # Frames in the per-row maximum: every frame HF keeps whose window [160 t - 200, 160 t + 200) touches
        # valid audio (160 t - 200 <= length - 1); HF keeps max(3000, valid) frames.
        stat_frames = torch.minimum(
            num_frames(lengths + _HALF), frame_lengths.clamp(min=WINDOW_FRAMES)
        )  # (B,)
        num_compute = max(num_out, int(stat_frames.max()))
        # Original samples read by the frames we keep: [-200, 160 (num_compute - 1) + 200).
        buf_len = max(HOP_LENGTH * (num_compute - 1) + _HALF, max_len)

        x = waveforms[:, :max_len].float()
        x = x.masked_fill(torch.arange(max_len, device=device) >= lengths[:, None], 0.0)  # (B, max_len)
        # N_FFT // 2 spare columns so that the reflection below always fits; they only feed unused frames.
        x = nn.functional.pad(x, (0, buf_len + _HALF - max_len))  # (B, buf_len + 200)
        # Right end of HF's buffer, where it lies inside ours: x[padded + j] = x[padded - 2 - j], j < 200.
        rows = (padded < buf_len).nonzero().squeeze(1)  # (R,)
        if rows.numel():
            offs = torch.arange(_HALF, device=device)
            src = padded[rows, None] - 2 - offs  # (R, 200)
            x[rows[:, None], padded[rows, None] + offs] = torch.gather(x[rows], 1, src)

        # Left end: torch's reflect padding equals HF's, since both see the same first N_FFT // 2 + 1 samples.
        # Right end: the frames we keep end before torch's own right padding (at buf_len + 200).
        window = self.window.to(device)
        stft = torch.stft(
            x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
        )  # (B, N_FFT // 2 + 1, (buf_len + 200) // 160 + 1)
        power = stft[..., :num_compute].abs().pow(2)  # (B, 201, num_compute)
        mel = self.mel_filters.to(device) @ power  # (B, n_mels, num_compute)
        log_spec = mel.clamp(min=1e-10).log10()

        frame_idx = torch.arange(num_compute, device=device)
        in_stats = (frame_idx < stat_frames[:, None])[:, None, :]  # (B, 1, num_compute)
        row_max = log_spec.masked_fill(~in_stats, float("-inf")).amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        log_spec = torch.maximum(log_spec[..., :num_out], row_max - 8.0)  # (B, n_mels, T)
        features = (log_spec + 4.0) / 4.0
        if self.pad_to_window:  # HF's values in the padding up to 30 s (frames past a longer row's end: 0.0)
            valid = (frame_idx[:num_out] < frame_lengths.clamp(min=WINDOW_FRAMES)[:, None])[:, None, :]
        else:
            valid = (frame_idx[:num_out] < frame_lengths[:, None])[:, None, :]  # (B, 1, T)
        features = features.masked_fill(~valid, 0.0)
        return features, frame_lengths
