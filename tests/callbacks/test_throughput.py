"""ThroughputMonitor: real tokens, model FLOPs and MFU of packed and padded batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aero_lightning.callbacks.throughput import ThroughputMonitor
from aero_lightning.data.chat import encode_chat
from aero_lightning.data.packing import collate_packed, collate_padded
from aero_lightning.model.flops import count_params, step_flops


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


def test_packed_and_padded_batches_count_the_same_tokens_and_flops(model, make_samples):
    packed, padded = _batches(model, make_samples)
    module = _Module(model)
    trainer = SimpleNamespace(precision="bf16-mixed", datamodule=None)
    expected = step_flops(count_params(model), [35, 115, 55], torch.diff(packed["cu_seqlens"]).tolist())[
        "total"
    ]
    for batch in (packed, padded):
        monitor = ThroughputMonitor(window=1, peak_flops=1e9)
        monitor.on_train_start(trainer, module)
        monitor.on_train_batch_start(trainer, module, batch, 0)
        assert monitor._flops == expected
        assert monitor._tokens == packed["input_ids"].shape[1]
        monitor.on_train_batch_end(trainer, module, None, batch, 0)
        logged = dict(module.logged)
        assert logged["perf/mfu"] == pytest.approx(logged["perf/model_tflops_per_s"] * 1e12 / 1e9)
        padding = logged["perf/padding_ratio"]
        assert padding == 0.0 if batch is packed else padding > 0.1


def test_no_mfu_without_a_known_peak(model, make_samples):
    packed, _ = _batches(model, make_samples)
    module = _Module(model)
    trainer = SimpleNamespace(precision="32-true", datamodule=None)
    monitor = ThroughputMonitor(window=1)
    monitor.on_train_start(trainer, module)
    monitor.on_train_batch_start(trainer, module, packed, 0)
    monitor.on_train_batch_end(trainer, module, None, packed, 0)
    assert "perf/mfu" not in module.logged and module.logged["perf/model_tflops_per_s"] > 0
