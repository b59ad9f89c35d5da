"""ThroughputMonitor: per-device rates over all processes, whole-model and lmms-engine FLOPs, padding, MFU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aero_lightning.callbacks import throughput
from aero_lightning.callbacks.throughput import ThroughputMonitor
from aero_lightning.data.chat import encode_chat
from aero_lightning.data.packing import collate_packed, collate_padded
from aero_lightning.model.flops import batch_targets

# The tiny model's counts, worked by hand in tests/model/test_flops.py.
ENC_PER_FRAME = 65_536 + 43_008  # encoder Linears + conv stem
ENC_ATTN = 2 * 64  # layers x width
PROJ, STACK_K = 40_960, 4
LLM_BODY, HEAD, LLM_ATTN = 92_928 - 19_200, 19_200, 2 * 64  # LLM Linears without the head; head V·d
LMMS_N, LMMS_ATTN = 112_128, 16 * 4 * 2  # lmms-engine: N_lmms and head_dim·heads·layers
FRAMES = [35, 115, 55]  # encoder frames of the 0.7 s, 2.3 s and 1.1 s clips
AUDIO_S = 0.7 + 2.3 + 1.1


def _batches(model, make_samples):
    counter = model.audio_token_counter()
    samples = []
    for s in make_samples([0.7, 2.3, 1.1]):
        enc = encode_chat(model.tokenizer, s["messages"], [counter(len(s["waveform"]))])
        samples.append(s | {"input_ids": enc.input_ids, "labels": enc.labels})
    return collate_packed(samples, counter), collate_padded(samples, counter, model.tokenizer.pad_token_id)


class _Module(SimpleNamespace):
    def __init__(self, model):
        super().__init__(model=model, device=torch.device("cpu"), logged={})

    def log_dict(self, metrics, **kwargs):
        self.logged.update(metrics)

    def log(self, name, value, **kwargs):
        self.logged[name] = value


class _TwoRanks:
    """A strategy whose sum-reduce adds another rank's window counts (tokens, positions, audio samples, FLOPs,
    lmms-engine FLOPs)."""

    OTHER = (100.0, 120.0, 32_000.0, 3.0e8, 1.0e8)

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + torch.tensor(self.OTHER, dtype=tensor.dtype)


def _clock(monkeypatch, times):
    ticks = iter(times)
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))


def test_rates_are_per_device_over_all_processes(model, make_samples, monkeypatch):
    """One window of one batch on each of 2 processes, 2.0 s long: every rate is the two processes' sum / 2 / 2.0 s;
    the whole-model and lmms-engine FLOPs of the batch are the hand-worked counts; packed and padded batches of the
    same samples count the same."""
    packed, padded = _batches(model, make_samples)
    docs = torch.diff(packed["cu_seqlens"]).tolist()
    tokens, targets = sum(docs), batch_targets(packed)
    assert tokens == packed["input_ids"].shape[1] and 0 < targets < tokens
    whole = (
        6 * ENC_PER_FRAME * sum(FRAMES)
        + 12 * ENC_ATTN * sum(f * f for f in FRAMES)
        + 6 * PROJ * sum(-(-f // STACK_K) for f in FRAMES)
        + 6 * LLM_BODY * tokens
        + 12 * LLM_ATTN * sum(d * d for d in docs)
        + 6 * HEAD * targets  # the LM head at target positions only
    )
    lmms = 6 * LMMS_N * tokens + 12 * LMMS_ATTN * sum(d * d for d in docs)
    other_tokens, other_positions, other_samples, other_flops, other_llm = _TwoRanks.OTHER
    for batch in (packed, padded):
        _clock(monkeypatch, [10.0, 100.0, 100.5, 102.0, 102.0])  # init, train start, batch start, end, reset
        module = _Module(model)
        trainer = SimpleNamespace(precision="bf16-mixed", datamodule=None, strategy=_TwoRanks(), world_size=2)
        monitor = ThroughputMonitor(window=1, peak_flops=1e9)
        monitor.on_train_start(trainer, module)
        monitor.on_train_batch_start(trainer, module, batch, 0)
        assert monitor._counts["flops"] == whole and monitor._counts["flops_llm"] == lmms
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
        logged = module.logged
        positions = batch["input_ids"].numel()
        device_s = 2 * 2.0  # 2 processes x 2.0 s
        assert logged["perf/tokens_per_s"] == pytest.approx((tokens + other_tokens) / device_s, rel=1e-12)
        audio = (AUDIO_S + other_samples / 16000) / device_s
        assert logged["perf/audio_s_per_s"] == pytest.approx(audio, rel=1e-4)  # clips are whole samples
        assert logged["perf/model_tflops_per_s"] == pytest.approx(
            (whole + other_flops) / device_s / 1e12, rel=1e-12
        )
        assert logged["perf/llm_tflops_per_s"] == pytest.approx(
            (lmms + other_llm) / device_s / 1e12, rel=1e-12
        )
        assert logged["perf/mfu"] == pytest.approx((whole + other_flops) / device_s / 1e9, rel=1e-12)
        assert logged["perf/mfu_llm"] == pytest.approx((lmms + other_llm) / device_s / 1e9, rel=1e-12)
        padding = 1 - (tokens + other_tokens) / (positions + other_positions)
        assert logged["perf/padding_ratio"] == pytest.approx(padding, rel=1e-12)
        assert logged["perf/data_wait_frac"] == 0.0  # the first batch of the run has no previous batch end
        assert logged["tok/s"] == logged["perf/tokens_per_s"] and logged["mfu"] == logged["perf/mfu"]


def test_single_process_and_no_mfu_without_a_known_peak(model, make_samples, monkeypatch):
    packed, _ = _batches(model, make_samples)
    _clock(monkeypatch, [0.0, 0.0, 0.0, 0.5, 0.5])
    module = _Module(model)
    trainer = SimpleNamespace(precision="32-true", datamodule=None)  # no strategy: one process
    monitor = ThroughputMonitor(window=1)
    monitor.on_train_start(trainer, module)
    monitor.on_train_batch_start(trainer, module, packed, 0)
    monitor.on_train_batch_end(trainer, module, None, packed, 0)
    assert "perf/mfu" not in module.logged and "perf/mfu_llm" not in module.logged
    docs = torch.diff(packed["cu_seqlens"]).tolist()
    assert module.logged["perf/tokens_per_s"] == sum(docs) / 0.5
    lmms = 6 * LMMS_N * sum(docs) + 12 * LMMS_ATTN * sum(d * d for d in docs)
    assert module.logged["perf/llm_tflops_per_s"] == pytest.approx(lmms / 0.5 / 1e12, rel=1e-12)


def test_a_batch_of_cached_encoder_outputs_counts_no_encoder_flops(model, make_samples, monkeypatch):
    """The same samples with their encoder frames from a cache (data.encoder_cache): the whole-model FLOPs lose the
    encoder's (the step does not run it), the audio seconds stay."""
    counter = model.audio_token_counter()
    cached = []
    for s in make_samples([0.7, 2.3, 1.1]):
        enc = encode_chat(model.tokenizer, s["messages"], [counter(len(s["waveform"]))])
        frames = torch.zeros(int(counter.encoder_frames(len(s["waveform"]))), 64, dtype=torch.float16)
        cached.append(
            {k: v for k, v in s.items() if k != "waveform"}
            | {"input_ids": enc.input_ids, "labels": enc.labels}
            | {"encoder_states": [frames], "clip_samples": [len(s["waveform"])]}
        )
    batch = collate_packed(cached, counter)
    assert "audio_pcm" not in batch and batch["encoder_frame_lengths"].tolist() == FRAMES
    docs = torch.diff(batch["cu_seqlens"]).tolist()
    without_encoder = (
        6 * PROJ * sum(-(-f // STACK_K) for f in FRAMES)
        + 6 * LLM_BODY * sum(docs)
        + 12 * LLM_ATTN * sum(d * d for d in docs)
        + 6 * HEAD * batch_targets(batch)
    )
    _clock(monkeypatch, [0.0, 0.0, 0.0, 0.5, 0.5])
    module = _Module(model)
    monitor = ThroughputMonitor(window=1)
    monitor.on_train_start(SimpleNamespace(precision="32-true", datamodule=None), module)
    monitor.on_train_batch_start(SimpleNamespace(), module, batch, 0)
    assert monitor._counts["flops"] == without_encoder
    assert monitor._counts["audio_samples"] == round(AUDIO_S * 16000)
