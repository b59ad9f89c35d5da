"""HuBERT / wav2vec 2.0 adapter: Whisper's frame count per window, windows independent of each other's padding,
and an AeroModel that trains on raw waveforms with every trainable parameter getting a gradient."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.ssl_tiny import build_tiny_ssl

from aero_lightning.data.audio_tokens import AudioTokenCounter, samples_encoder_frames
from aero_lightning.data.packing import collate_packed
from aero_lightning.model.build import build_aero_model
from aero_lightning.model.encoders import WhisperAudioEncoder
from aero_lightning.model.flops import count_params
from aero_lightning.model.projector import AvgPoolProjector
from aero_lightning.model.ssl_encoders import (
    SSLAudioEncoder,
    WaveformWindows,
    conv_geometry,
)

LENGTHS = [1, 159, 160, 161, 399, 400, 3200, 16_001, 480_000]


@pytest.fixture(scope="module", params=["hubert", "wav2vec2"])
def ssl_dir(request, tmp_path_factory):
    return build_tiny_ssl(tmp_path_factory.mktemp(request.param), request.param), request.param


def test_wav2vec2_conv_stack_geometry():
    assert conv_geometry((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)) == (400, 320)


def test_samples_encoder_frames_match_the_audio_token_counter():
    counter = AudioTokenCounter(encoder_downsample=2, projector_downsample=1)  # tokens = encoder frames
    for n in LENGTHS:
        assert samples_encoder_frames(n) == counter.tokens_per_window(n)
    assert samples_encoder_frames(torch.tensor(LENGTHS)).tolist() == [
        samples_encoder_frames(n) for n in LENGTHS
    ]
    assert samples_encoder_frames(480_000) == 1500


def test_frames_per_window_are_whispers(ssl_dir):
    path, _ = ssl_dir
    enc = SSLAudioEncoder.from_pretrained(path).eval()
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        hidden, frames = enc(torch.randn(len(LENGTHS), 480_000), lengths)
    expected = [samples_encoder_frames(n) for n in LENGTHS]
    assert frames.tolist() == expected
    assert hidden.shape == (len(LENGTHS), 1500, 64)
    # the conv stack really produces that many frames from the padded length
    needed = enc.receptive_field + (frames - 1) * enc.stride
    assert enc.encoder._get_feat_extract_output_lengths(needed).tolist() == expected
    assert enc.encoder.config.layerdrop == 0.0 and not enc.encoder.config.apply_spec_augment


def test_windows_are_independent_of_batch_padding(ssl_dir):
    path, _ = ssl_dir
    enc = SSLAudioEncoder.from_pretrained(path).eval()
    torch.manual_seed(0)
    lengths = torch.tensor([400, 3_200, 16_001])
    waves = torch.randn(3, 16_001)
    noisy = waves.clone()
    for i, n in enumerate(lengths.tolist()):
        noisy[i, n:] = 100.0  # what lies past a window's length must not matter
    with torch.no_grad():
        batch, frames = enc(waves, lengths)
        batch_noisy, _ = enc(noisy, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone, f = enc(waves[i : i + 1, :n], lengths[i : i + 1])
            torch.testing.assert_close(batch[i, : frames[i]], alone[0, : f[0]], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch_noisy[i, : frames[i]], batch[i, : frames[i]])


def test_aero_model_with_ssl_encoder_trains_on_waveforms(ssl_dir, tiny_dir, make_encoded):
    path, kind = ssl_dir
    torch.manual_seed(0)
    model = build_aero_model(
        {"type": kind, "name_or_path": str(path)},
        {"name_or_path": str(tiny_dir / "llm")},
        functools.partial(AvgPoolProjector, pool=2),
        attn_implementation="varlen",
    )
    assert isinstance(model.encoder, SSLAudioEncoder) and isinstance(model.feature_extractor, WaveformWindows)
    counter = model.audio_token_counter()
    docs = make_encoded(model.tokenizer, counter, [0.7, 2.0, 31.0])  # 31 s: two windows
    batch = collate_packed(docs, counter)
    model.train()
    out = model.forward_batch(batch)
    assert torch.isfinite(out.loss) and int(out.num_target_tokens) > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing  # no LayerDrop / SpecAugment holes: DDP and ZeRO need every gradient
    params = count_params(model)  # the throughput callback's FLOPs count works on it
    assert params.encoder.trainable_layers == 2 and params.encoder.attn_width == 64


def test_build_aero_model_defaults_to_whisper(tiny_dir):
    model = build_aero_model(
        {"name_or_path": str(tiny_dir / "encoder")},
        {"name_or_path": str(tiny_dir / "llm")},
        functools.partial(AvgPoolProjector, pool=2),
    )
    assert isinstance(model.encoder, WhisperAudioEncoder)
    assert not isinstance(model.feature_extractor, WaveformWindows)


def test_wrong_encoder_types_are_refused(tiny_dir, tmp_path):
    hubert = build_tiny_ssl(tmp_path / "hubert", "hubert")
    llm = {"name_or_path": str(tiny_dir / "llm")}
    projector = functools.partial(AvgPoolProjector, pool=2)
    with pytest.raises(ValueError, match="model.encoder.type must be"):
        build_aero_model({"type": "conformer", "name_or_path": str(hubert)}, llm, projector)
    with pytest.raises(ValueError, match="is a hubert"):
        build_aero_model({"type": "wav2vec2", "name_or_path": str(hubert)}, llm, projector)
    with pytest.raises(ValueError, match="SSLAudioEncoder takes"):
        SSLAudioEncoder.from_pretrained(tiny_dir / "encoder")
    with pytest.raises(ValueError, match="does not match model.encoder.expect"):
        build_aero_model(
            {"type": "hubert", "name_or_path": str(hubert), "expect": {"hidden_size": 1024}}, llm, projector
        )
