"""The samples -> windows -> log-mel frames -> encoder frames -> audio tokens arithmetic, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from aero_lightning.data.audio_tokens import (
    AudioTokenCounter,
    ceil_div,
    encoder_frames,
    mel_frames,
    projected_tokens,
    samples_encoder_frames,
    window_lengths,
)

SAMPLES = [1, 159, 160, 161, 399, 400, 3200, 16_001, 479_999, 480_000]


def test_ceil_div_is_exact_for_ints_and_tensors():
    values = [0, 1, 2, 3, 159, 160, 161, 10**12 + 1]
    assert [ceil_div(v, 160) for v in values] == [math.ceil(v / 160) for v in values[:-1]] + [6_250_000_001]
    assert ceil_div(torch.tensor(values), 160).tolist() == [ceil_div(v, 160) for v in values]


def test_hand_counted_stages():
    # 1 s = 16 000 samples -> 100 mel frames -> 50 encoder frames (50 Hz) -> 25 avg-pool tokens, 13 stack-4 tokens
    assert mel_frames(16_000) == 100 and encoder_frames(100) == 50
    assert projected_tokens(50, 2) == 25 and projected_tokens(50, 4) == 13
    # a full 30 s window: 3000 frames, 1500 encoder frames, Aero's 750 tokens
    assert mel_frames(480_000) == 3000 and samples_encoder_frames(480_000) == 1500
    # conv2 (kernel 3, stride 2, padding 1) gives floor((T - 1) / 2) + 1 frames: ceil(T / 2)
    for t in (1, 2, 3, 77, 1234, 2999, 3000):
        assert encoder_frames(t) == (t - 1) // 2 + 1
    assert [samples_encoder_frames(n) for n in (1, 160, 161, 320, 321)] == [1, 1, 1, 1, 2]


def test_window_split():
    assert window_lengths(1) == [1]
    assert window_lengths(480_000) == [480_000]
    assert window_lengths(480_001) == [480_000, 1]
    assert window_lengths(31 * 16_000) == [480_000, 16_000]
    with pytest.raises(ValueError, match="at least one sample"):
        window_lengths(0)


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_counter_sums_windows(k):
    counter = AudioTokenCounter(projector_downsample=k)
    for n in SAMPLES + [480_001, 15 * 60 * 16_000]:
        expected = sum(math.ceil(math.ceil(math.ceil(w / 160) / 2) / k) for w in window_lengths(n))
        assert counter(n) == expected, (n, k)
    # a 15-minute clip is 30 full windows: 30 x 750 Aero tokens
    assert AudioTokenCounter(projector_downsample=2)(15 * 60 * 16_000) == 22_500
    frames = counter.encoder_frames(torch.tensor(SAMPLES))
    assert frames.dtype == torch.int64 and frames.tolist() == [samples_encoder_frames(n) for n in SAMPLES]
