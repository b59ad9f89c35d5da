"""LogMelSpectrogram against transformers.WhisperFeatureExtractor; the 16-bit PCM the batches carry."""

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.chat import asr_messages
from aero_lightning.data.datamodule import AsrCollator
from aero_lightning.data.features import (
    HOP_LENGTH,
    N_FFT,
    SAMPLE_RATE_HZ,
    WINDOW_FRAMES,
    WINDOW_SAMPLES,
    LogMelSpectrogram,
    num_frames,
    pcm_windows,
)
from aero_lightning.data.packing import to_pcm16

ATOL_HF = 1e-5  # measured max abs difference on CPU: 0.0 (up to 1.2e-7 for clips shorter than one hop)


def _audio(num_samples: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SAMPLE_RATE_HZ
    if kind == "sine":
        x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    elif kind == "noise":
        x = 0.3 * rng.standard_normal(num_samples)
    elif kind == "click_at_end":
        # Quiet tone after 1 s of digital silence, then a loud click in the last 30 samples: the frame after
        # the last valid one sees the click best, so the per-clip maximum must include it (as HF's does).
        x = 1e-3 * np.sin(2 * np.pi * 440 * t)
        x[:SAMPLE_RATE_HZ] = 0.0
        x[-30:] = 0.9 * rng.standard_normal(30)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def _hf(audio: np.ndarray, num_mel_bins: int) -> np.ndarray:
    fe = WhisperFeatureExtractor(feature_size=num_mel_bins)
    return fe(audio, sampling_rate=SAMPLE_RATE_HZ, return_tensors="np")["input_features"][0]


def _ours(module: LogMelSpectrogram, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return module(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))


@pytest.mark.parametrize("num_mel_bins", [80, 128])
@pytest.mark.parametrize(
    ("num_samples", "kind"),
    [
        (WINDOW_SAMPLES, "sine"),  # exactly 30 s: the last frames see HF's reflect padding of the audio
        (WINDOW_SAMPLES, "noise"),
        (116800, "sine"),  # 7.3 s, zero-padded to 30 s by HF
        (116800, "noise"),
        (116873, "click_at_end"),  # not a multiple of the hop
        (116800, "click_at_end"),
        (479900, "noise"),  # within N_FFT // 2 of 30 s: HF's right reflection reaches the audio
        (100, "noise"),  # shorter than one hop
    ],
)
def test_matches_whisper_feature_extractor(num_mel_bins, num_samples, kind):
    audio = _audio(num_samples, kind)
    feats, frame_lengths = _ours(LogMelSpectrogram(num_mel_bins), audio)
    n_frames = num_frames(num_samples)
    assert feats.shape == (1, num_mel_bins, n_frames)
    assert feats.dtype == torch.float32
    assert frame_lengths.tolist() == [n_frames]
    ref = _hf(audio, num_mel_bins)[:, :n_frames]
    np.testing.assert_allclose(feats[0].numpy(), ref, rtol=0, atol=ATOL_HF)


def test_tail_frames_enter_the_maximum():
    # Using only the valid frames for the per-clip maximum would be off by 0.37 here; HF includes the frame
    # after the end, whose window still overlaps the audio.
    audio = _audio(116800, "click_at_end")
    feats, _ = _ours(LogMelSpectrogram(80), audio)
    ref = _hf(audio, 80)[:, : num_frames(len(audio))]
    assert ref.min() > -1.0  # the floor (max - 8) is active: digital silence is floored, not at -10
    np.testing.assert_allclose(feats[0].numpy(), ref, rtol=0, atol=ATOL_HF)


def test_batch_equals_rows_alone_and_ignores_padding_values():
    module = LogMelSpectrogram(80)
    lengths = [WINDOW_SAMPLES, 116873, 16000]
    rows = [_audio(n, "noise", seed=i) for i, n in enumerate(lengths)]
    batch = torch.full((3, WINDOW_SAMPLES + 50), 7.0)  # garbage beyond each length must be ignored
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.from_numpy(row)
    feats, frame_lengths = module(batch, torch.tensor(lengths))
    assert feats.shape == (3, 80, WINDOW_FRAMES)
    for i, row in enumerate(rows):
        alone, alone_len = _ours(module, row)
        assert frame_lengths[i] == alone_len[0]
        torch.testing.assert_close(feats[i, :, : alone.shape[-1]], alone[0], rtol=0, atol=1e-6)


def test_longer_than_30_s_batch_equals_alone():
    module = LogMelSpectrogram(80)
    lengths = [WINDOW_SAMPLES + 12345, 32000]
    rows = [_audio(n, "sine", seed=i) for i, n in enumerate(lengths)]
    batch = torch.zeros(2, max(lengths))
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.from_numpy(row)
    feats, frame_lengths = module(batch, torch.tensor(lengths))
    assert frame_lengths.tolist() == [num_frames(n) for n in lengths]
    for i, row in enumerate(rows):
        alone, _ = _ours(module, row)
        torch.testing.assert_close(feats[i, :, : alone.shape[-1]], alone[0], rtol=0, atol=1e-6)


def test_frames_beyond_length_are_zero():
    lengths = torch.tensor([48000, 1601, 160, 161])
    feats, frame_lengths = LogMelSpectrogram(80)(torch.randn(4, 48000) * 0.1, lengths)
    assert frame_lengths.tolist() == [300, 11, 1, 2]
    assert frame_lengths.dtype == torch.long
    assert feats.shape == (4, 80, 300)
    for i, n in enumerate(frame_lengths.tolist()):
        assert torch.all(feats[i, :, n:] == 0.0)
        assert torch.all(feats[i, :, :n] != 0.0)


def test_num_frames_int_and_tensor():
    assert HOP_LENGTH == 160 and N_FFT == 400 and WINDOW_FRAMES == WINDOW_SAMPLES // HOP_LENGTH
    assert num_frames(WINDOW_SAMPLES) == WINDOW_FRAMES
    assert [num_frames(n) for n in (0, 1, 159, 160, 161, 116800)] == [0, 1, 1, 1, 2, 730]
    got = num_frames(torch.tensor([0, 1, 160, 161, WINDOW_SAMPLES]))
    assert got.dtype == torch.long and got.tolist() == [0, 1, 1, 2, WINDOW_FRAMES]


def test_128_bins_shape_and_buffers():
    module = LogMelSpectrogram(num_mel_bins=128)
    assert module.mel_filters.shape == (128, N_FFT // 2 + 1)
    assert module.state_dict() == {}  # filters and window are non-persistent buffers
    feats, _ = module(torch.zeros(2, 32000), torch.tensor([32000, 16000]))
    assert feats.shape == (2, 128, 200)


def test_half_precision_input_computes_in_float32():
    module = LogMelSpectrogram(80)
    audio = torch.from_numpy(_audio(16000, "sine"))[None]
    ref, _ = module(audio.to(torch.bfloat16).float(), torch.tensor([16000]))
    feats, _ = module.to(torch.bfloat16)(audio.to(torch.bfloat16), torch.tensor([16000]))
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-5)


def test_bad_shapes_raise():
    module = LogMelSpectrogram(80)
    with pytest.raises(ValueError):
        module(torch.zeros(2, 100), torch.tensor([100]))
    with pytest.raises(ValueError):
        module(torch.zeros(1, 100), torch.tensor([101]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    lengths = [WINDOW_SAMPLES, 116873, 16000]
    batch = torch.zeros(3, WINDOW_SAMPLES)
    for i, n in enumerate(lengths):
        batch[i, :n] = torch.from_numpy(_audio(n, "noise", seed=i))
    module = LogMelSpectrogram(128)
    cpu, cpu_len = module(batch, torch.tensor(lengths))
    gpu, gpu_len = module.cuda()(batch.cuda(), torch.tensor(lengths).cuda())
    assert gpu_len.cpu().tolist() == cpu_len.tolist()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


def test_dtype_cast_keeps_float32_buffers():
    module = LogMelSpectrogram(80).to(torch.bfloat16)
    assert module.mel_filters.dtype == torch.float32 and module.window.dtype == torch.float32
    torch.testing.assert_close(module.mel_filters, LogMelSpectrogram(80).mel_filters, rtol=0, atol=0)


def test_pcm_windows_unpack_the_collated_pcm_exactly():
    pcm = torch.tensor([1, -2, 3, 32767, -32768, 5, 6], dtype=torch.int16)
    windows = pcm_windows(pcm, torch.tensor([3, 2, 2]))
    assert windows.dtype == torch.float32 and windows.shape == (3, 3)
    assert windows.mul(32768).tolist() == [[1, -2, 3], [32767, -32768, 0], [5, 6, 0]]
    with pytest.raises(ValueError, match="sum to 6 samples but audio_pcm holds 7"):
        pcm_windows(pcm, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="int16"):
        pcm_windows(pcm.float(), torch.tensor([7]))


def test_to_pcm16_is_lossless_for_16_bit_audio():
    rng = np.random.default_rng(0)
    ints = rng.integers(-32768, 32767, 1000, dtype=np.int16)
    floats = ints.astype(np.float32) / 32768  # what libsndfile gives for a PCM_16 FLAC
    assert np.array_equal(to_pcm16(floats), ints)
    assert to_pcm16(ints) is ints
    assert to_pcm16(np.array([1.5, -1.5, 0.5], dtype=np.float32)).tolist() == [32767, -32768, 16384]


def test_deepspeed_bf16_leaves_the_audio_exact(tokenizer):
    """DeepSpeed's bf16 precision casts every float tensor of a batch (``convert_input``); the audio travels as int16,
    which it leaves alone, so log-mel is computed from the exact waveform (it was off by up to 0.3 from float
    windows rounded to bf16)."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    samples = [
        {"key": f"k{i}", "waveform": to_pcm16(_audio(n, "sine")), "messages": asr_messages("a b")}
        for i, n in enumerate([16_000, 40_000])
    ]
    counter = AudioTokenCounter(projector_downsample=4)
    batch = AsrCollator(tokenizer, counter)(samples)
    cast = DeepSpeedPrecision("bf16-mixed").convert_input(dict(batch))
    assert cast["audio_pcm"].dtype == torch.int16 and torch.equal(cast["audio_pcm"], batch["audio_pcm"])
    log_mel = LogMelSpectrogram(80)
    reference, _ = log_mel(pcm_windows(batch["audio_pcm"], batch["window_lengths"]), batch["window_lengths"])
    features, _ = log_mel(pcm_windows(cast["audio_pcm"], cast["window_lengths"]), cast["window_lengths"])
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-5)
    # the defect this replaces: float32 windows in the batch come out of convert_input as bf16
    windows = pcm_windows(batch["audio_pcm"], batch["window_lengths"])
    rounded = DeepSpeedPrecision("bf16-mixed").convert_input({"audio": windows})["audio"]
    assert rounded.dtype == torch.bfloat16
    off, _ = log_mel(rounded.float(), batch["window_lengths"])
    assert float((off - reference).abs().max()) > 0.05
