"""The exported feature extractor for HuBERT / wav2vec 2.0 models: 30 s windows of the waveform, normalised as
Wav2Vec2FeatureExtractor does, with the training code's audio token count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.hf.feature_extraction_aero import AeroFeatureExtractor


def test_waveform_windows_are_normalised_like_wav2vec2_feature_extractor():
    rng = np.random.default_rng(0)
    clips = [(0.3 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in (400, 16_001, 640_000)]
    fe = AeroFeatureExtractor(feature_type="waveform", projector_downsample=5)
    feats = fe(clips, sampling_rate=16_000)
    lengths = [400, 16_001, 480_000, 160_000]  # the 40 s clip is two windows
    assert feats["input_features"].shape == (4, 480_000)
    assert feats["feature_lengths"].tolist() == lengths
    assert feats["windows_per_clip"].tolist() == [1, 1, 2]
    counter = AudioTokenCounter(projector_downsample=5)
    assert feats["num_audio_tokens"].tolist() == [counter(len(c)) for c in clips] == [1, 11, 400]
    windows = [clips[0], clips[1], clips[2][:480_000], clips[2][480_000:]]
    reference = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)(
        windows, sampling_rate=16_000, padding="longest", return_tensors="pt"
    )["input_values"]  # (4, 480000), zero past each window
    torch.testing.assert_close(feats["input_features"], reference, atol=2e-5, rtol=1e-5)
    for row, n in zip(feats["input_features"], lengths):
        assert float(row[:n].mean().abs()) < 1e-4 and abs(float(row[:n].std(correction=0)) - 1) < 1e-4
        assert not row[n:].any()

    raw = AeroFeatureExtractor(feature_type="waveform", do_normalize=False)(clips[1], sampling_rate=16_000)
    assert torch.equal(raw["input_features"][0], torch.from_numpy(clips[1]))


def test_feature_type_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="feature_type must be one of"):
        AeroFeatureExtractor(feature_type="mfcc")
    AeroFeatureExtractor(feature_type="waveform", do_normalize=False).save_pretrained(tmp_path)
    loaded = AeroFeatureExtractor.from_pretrained(tmp_path)
    assert (loaded.feature_type, loaded.do_normalize) == ("waveform", False)
    assert AeroFeatureExtractor().feature_type == "log_mel"  # folders exported before keep log-mel
