"""Whisper encoder adapter against HF ``WhisperEncoder.forward``, and padding-free invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids

from aero_lightning.model.encoders import PaddingFreeWhisperEncoder, WhisperAudioEncoder

ATOL = 1e-5


def _load(tiny_dir, padding_free: bool, attn_implementation: str = "sdpa") -> WhisperAudioEncoder:
    return WhisperAudioEncoder.from_pretrained(
        str(tiny_dir / "encoder"), padding_free=padding_free, attn_implementation=attn_implementation
    ).eval()


def _hf(encoder: WhisperAudioEncoder, features: torch.Tensor) -> torch.Tensor:
    """The untouched parent-class forward (30 s windows only)."""
    return WhisperEncoder.forward(encoder.encoder, features).last_hidden_state


@torch.no_grad()
def test_padded_mode_equals_hf_on_full_windows(tiny_dir):
    encoder = _load(tiny_dir, padding_free=False)
    torch.manual_seed(0)
    features = torch.randn(2, encoder.num_mel_bins, 3000)
    hidden, lengths = encoder(features, torch.tensor([3000, 3000]))
    assert hidden.shape == (2, 1500, encoder.hidden_size)
    assert lengths.tolist() == [1500, 1500]
    torch.testing.assert_close(hidden, _hf(encoder, features), rtol=0, atol=ATOL)


@torch.no_grad()
def test_padded_mode_equals_hf_on_short_window(tiny_dir):
    encoder = _load(tiny_dir, padding_free=False)
    torch.manual_seed(0)
    n_mels, length = encoder.num_mel_bins, 1234
    features = torch.randn(1, n_mels, length)
    padded = torch.nn.functional.pad(features, (0, 3000 - length))  # what HF's extractor would feed
    expected = _hf(encoder, padded)[:, : math.ceil(length / 2)]

    hidden, lengths = encoder(features, torch.tensor([length]))
    assert hidden.shape == (1, 617, encoder.hidden_size) and lengths.tolist() == [617]
    torch.testing.assert_close(hidden, expected, rtol=0, atol=ATOL)

    # A 3000-wide input is taken as given, like HF's: its padding frames are part of the input
    full = torch.cat([features, torch.randn(1, n_mels, 3000 - length)], dim=-1)
    hidden_full, _ = encoder(full, torch.tensor([length]))
    torch.testing.assert_close(hidden_full, _hf(encoder, full), rtol=0, atol=ATOL)


@pytest.mark.parametrize("seconds", [1.0, 7.0, 29.0])
@torch.no_grad()
def test_not_padding_free_equals_hf_feature_extractor_and_encoder(tiny_dir, seconds):
    """``padding_free: false`` reproduces HF's Whisper pipeline from the waveform: WhisperFeatureExtractor pads the
    clip to 30 s and its padding frames carry the log-mel floor (``max - 8``), not zeros."""
    encoder = _load(tiny_dir, padding_free=False)
    rng = np.random.default_rng(int(seconds))
    n = int(seconds * 16000)
    wave = (0.3 * np.sin(np.arange(n) * 0.05) * rng.standard_normal(n)).astype(np.float32)
    hf_features = WhisperFeatureExtractor(feature_size=encoder.num_mel_bins)(
        wave, sampling_rate=16000, return_tensors="pt"
    ).input_features  # (1, n_mels, 3000)
    features, lengths = encoder.build_feature_extractor()(torch.from_numpy(wave)[None], torch.tensor([n]))
    assert features.shape == hf_features.shape and lengths.tolist() == [n // 160]
    torch.testing.assert_close(features, hf_features, rtol=0, atol=ATOL)
    hidden, out_lengths = encoder(features, lengths)
    torch.testing.assert_close(hidden, _hf(encoder, hf_features), rtol=0, atol=ATOL)
    assert out_lengths.tolist() == [math.ceil(n / 320)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_padding_free_batch_equals_each_window_alone(tiny_dir, attn_implementation):
    encoder = _load(tiny_dir, padding_free=True, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    window_frames = [3000, 1234, 77]
    batch = 10 * torch.randn(len(window_frames), encoder.num_mel_bins, 3000)  # garbage past each length
    alone = []
    for i, t in enumerate(window_frames):
        window = torch.randn(1, encoder.num_mel_bins, t)
        batch[i, :, :t] = window[0]
        out, out_len = encoder(window, torch.tensor([t]))
        assert out.shape == (1, math.ceil(t / 2), encoder.hidden_size) and out_len.tolist() == [
            math.ceil(t / 2)
        ]
        alone.append(out[0])

    hidden, lengths = encoder(batch, torch.tensor(window_frames))
    assert hidden.shape == (3, 1500, encoder.hidden_size)
    assert lengths.tolist() == [1500, 617, 39]
    for i, expected in enumerate(alone):
        torch.testing.assert_close(
            hidden[i, : expected.shape[0]], expected, rtol=0, atol=ATOL, msg=f"window {i}"
        )
        assert torch.isfinite(hidden[i]).all()


@torch.no_grad()
def test_padding_free_full_window_equals_hf(tiny_dir):
    encoder = _load(tiny_dir, padding_free=True)
    torch.manual_seed(1)
    features = torch.randn(1, encoder.num_mel_bins, 3000)
    hidden, _ = encoder(features, torch.tensor([3000]))
    torch.testing.assert_close(hidden, _hf(encoder, features), rtol=0, atol=ATOL)


@pytest.mark.parametrize("padding_free", [True, False])
def test_bad_inputs_raise(tiny_dir, padding_free):
    encoder = _load(tiny_dir, padding_free=padding_free)
    with pytest.raises(ValueError, match="mel bins"):
        encoder(torch.zeros(1, encoder.num_mel_bins + 48, 100), torch.tensor([100]))
    with pytest.raises(ValueError, match="3000"):
        encoder(torch.zeros(1, encoder.num_mel_bins, 3001), torch.tensor([3001]))


def test_sinusoidal_positions_stay_fixed(tiny_dir):
    """transformers' from_pretrained makes Whisper's positional table trainable; the adapter keeps it fixed."""
    encoder = WhisperAudioEncoder.from_pretrained(str(tiny_dir / "encoder"))
    table = encoder.encoder.embed_positions.weight
    assert not table.requires_grad
    feats = torch.randn(2, encoder.num_mel_bins, 100)
    hidden, _ = encoder(feats, torch.tensor([100, 60]))
    hidden.sum().backward()
    assert table.grad is None
    assert encoder.encoder.conv1.weight.grad is not None


def test_new_encoder_has_whisper_sinusoids_and_loading_keeps_the_checkpoint_table(tiny_dir, tmp_path, caplog):
    """A random-init encoder gets Whisper's sinusoid table (transformers 5.x leaves a subclass's at N(0, 0.02));
    ``from_pretrained`` must still load a checkpoint's own table rather than recompute it."""
    loaded = WhisperAudioEncoder.from_pretrained(str(tiny_dir / "encoder")).encoder
    table = loaded.embed_positions.weight
    expected = sinusoids(*table.shape)
    assert torch.equal(table, expected)
    assert torch.equal(PaddingFreeWhisperEncoder(loaded.config).embed_positions.weight, expected)

    with torch.no_grad():
        loaded.embed_positions.weight.mul_(0.5)
    loaded.save_pretrained(tmp_path / "encoder")
    reloaded = PaddingFreeWhisperEncoder.from_pretrained(tmp_path / "encoder")
    assert torch.equal(reloaded.embed_positions.weight, 0.5 * expected)
    # the adapter loads it too, and says the table is not Whisper's
    with caplog.at_level("WARNING", logger="aero_lightning.model.encoders"):
        WhisperAudioEncoder.from_pretrained(str(tmp_path / "encoder"))
    assert "not Whisper's sinusoids" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="aero_lightning.model.encoders"):
        WhisperAudioEncoder.from_pretrained(str(tiny_dir / "encoder"))
    assert "sinusoids" not in caplog.text
