"""Training throughput: real LLM tokens per second, audio seconds per second, padding ratio, data-wait fraction.

Only real tokens count (``attention_mask`` ones; every position of a packed row); padding is reported separately
as ``padding_ratio`` = padded positions / all positions of the LLM input. Training samples the stream skipped are
logged as ``data/rejected/<reason>`` (cumulative, this rank).
"""

from __future__ import annotations

import time

import lightning as L
import torch

from aero_lightning.data.features import SAMPLE_RATE_HZ


class ThroughputMonitor(L.Callback):
    """Log ``perf/tokens_per_s``, ``perf/audio_s_per_s``, ``perf/padding_ratio`` and ``perf/data_wait_frac``.

    Rates are measured over the last ``window`` optimizer steps of wall time (batch fetch included), per process.

    Args:
        window: steps per measurement.
    """

    def __init__(self, window: int = 10):
        self.window = window
        self._reset()
        self._batch_end: float | None = None

    def _reset(self) -> None:
        self._tokens = 0
        self._positions = 0
        self._audio_samples = 0
        self._wait_s = 0.0
        self._t0 = time.perf_counter()
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._wait_s += now - self._batch_end
        mask = batch.get("attention_mask")
        positions = batch["input_ids"].numel()
        self._tokens += int(mask.sum()) if mask is not None else positions
        self._positions += positions
        self._audio_samples += int(batch["window_lengths"].sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        self._batch_end = time.perf_counter()
        if self._steps < self.window:
            return
        elapsed = max(self._batch_end - self._t0, 1e-9)
        metrics = {
            "perf/tokens_per_s": self._tokens / elapsed,
            "perf/audio_s_per_s": self._audio_samples / SAMPLE_RATE_HZ / elapsed,
            "perf/padding_ratio": 1.0 - self._tokens / max(self._positions, 1),
            "perf/data_wait_frac": self._wait_s / elapsed,
        }
        if torch.cuda.is_available():
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "rejected_counts"):
            for reason, count in datamodule.rejected_counts().items():
                metrics[f"data/rejected/{reason}"] = float(count)
        pl_module.log_dict(metrics, prog_bar=False, rank_zero_only=True)
        pl_module.log("tok/s", metrics["perf/tokens_per_s"], prog_bar=True, rank_zero_only=True)
        self._reset()
