"""Training throughput and MFU: real tokens/s, audio seconds/s, model FLOP/s in two conventions, padding, data wait.

Only real tokens count (``attention_mask`` ones; every position of a packed row); padding is reported separately
as ``padding_ratio`` = padded positions / all positions of the LLM input. Model FLOPs per micro-batch come from
:mod:`aero_lightning.model.flops` in both of its conventions: the whole model (encoder, projector, LLM; trainable
vs frozen parts, per-document attention, the LM head at the loss's target positions), logged as ``perf/mfu``, and
the LLM's text FLOPs as lmms-engine counts them, logged as ``perf/mfu_llm`` (comparable with Aero's published MFU).
MFU = achieved model FLOP/s per device / the device's dense peak (bf16/fp16 table, or ``peak_flops`` given
explicitly), logged only when the peak is known (not on CPU). Training samples the stream skipped are logged as
``data/rejected/<reason>`` (cumulative, this rank).
"""

from __future__ import annotations

import time

import lightning as L
import torch

from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.model.flops import (
    batch_lengths,
    batch_targets,
    count_params,
    mfu,
    peak_flops,
    step_flops,
)

# the window counts summed over processes, in this order
_SUMMED = ("tokens", "positions", "audio_samples", "flops", "flops_llm")


class ThroughputMonitor(L.Callback):
    """Log ``perf/*`` rates over the last ``window`` training batches of wall time (batch fetch included).

    Rates are **per device**: the window's counts are summed over all processes (one all-reduce per window) and
    divided by the world size and by this process's wall time of the window (the ranks step together). Logged:

    - ``perf/tokens_per_s``: real LLM tokens (audio and text positions) per second per device.
    - ``perf/audio_s_per_s``: seconds of audio per second per device.
    - ``perf/model_tflops_per_s``, ``perf/mfu``: whole-model FLOPs (``step_flops(...)["total"]``; without the
      encoder's for batches of cached encoder outputs, where it does not run).
    - ``perf/llm_tflops_per_s``, ``perf/mfu_llm``: the LLM's text FLOPs as lmms-engine counts them
      (``step_flops(...)["lmms_engine"]``); the MFUs only when the peak is known.
    - ``perf/padding_ratio``: padded / all LLM input positions, all processes.
    - ``perf/data_wait_frac``, ``perf/peak_mem_gib`` (CUDA): this process.
    - ``tok/s`` and ``mfu`` on the progress bar.

    Args:
        window: training batches per measurement.
        peak_flops: peak FLOP/s of one device; None looks the device name up in
            :data:`aero_lightning.model.flops.PEAK_FLOPS_BF16` for bf16/fp16 precision.
    """

    def __init__(self, window: int = 10, peak_flops: float | None = None):
        self.window = window
        self.peak_flops_override = peak_flops
        self._batch_end: float | None = None
        self._params = None
        self._peak: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._counts = dict.fromkeys(_SUMMED, 0)
        self._wait_s = 0.0
        self._t0 = time.perf_counter()
        self._steps = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._params = count_params(pl_module.model)  # after freezing: trainable vs frozen is fixed from here
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self._peak = peak_flops(name, str(trainer.precision), override=self.peak_flops_override)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._wait_s += now - self._batch_end
        mask = batch.get("attention_mask")
        positions = batch["input_ids"].numel()
        counts = self._counts
        counts["tokens"] += int(mask.sum()) if mask is not None else positions
        counts["positions"] += positions
        counts["audio_samples"] += int(batch["window_lengths"].sum())
        if self._params is not None:
            windows, docs = batch_lengths(batch, pl_module.model.audio_token_counter())
            flops = step_flops(self._params, windows, docs, target_tokens=batch_targets(batch))
            # cached encoder outputs (data.encoder_cache): the encoder does not run in the step
            counts["flops"] += flops["total"] - (flops["encoder"] if "encoder_states" in batch else 0)
            counts["flops_llm"] += flops["lmms_engine"]

    def _summed(self, trainer, pl_module) -> dict[str, float]:
        """This window's counts summed over all processes (float64: exact to 2**53, FLOPs far below 1 ulp)."""
        local = torch.tensor(
            [float(self._counts[k]) for k in _SUMMED], dtype=torch.float64, device=pl_module.device
        )
        strategy = getattr(trainer, "strategy", None)
        total = strategy.reduce(local, reduce_op="sum") if strategy is not None else local
        return dict(zip(_SUMMED, total.tolist()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        self._batch_end = time.perf_counter()
        if self._steps < self.window:
            return
        elapsed = max(self._batch_end - self._t0, 1e-9)
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        total = self._summed(trainer, pl_module)
        per_device_s = world * elapsed  # device-seconds of the window
        flops_per_s = total["flops"] / per_device_s
        llm_flops_per_s = total["flops_llm"] / per_device_s
        metrics = {
            "perf/tokens_per_s": total["tokens"] / per_device_s,
            "perf/audio_s_per_s": total["audio_samples"] / SAMPLE_RATE_HZ / per_device_s,
            "perf/model_tflops_per_s": flops_per_s / 1e12,
            "perf/llm_tflops_per_s": llm_flops_per_s / 1e12,
            "perf/padding_ratio": 1.0 - total["tokens"] / max(total["positions"], 1.0),
            "perf/data_wait_frac": self._wait_s / elapsed,
        }
        if self._peak:
            metrics["perf/mfu"] = mfu(flops_per_s, self._peak)
            metrics["perf/mfu_llm"] = mfu(llm_flops_per_s, self._peak)
        if torch.cuda.is_available():
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "rejected_counts"):
            for reason, count in datamodule.rejected_counts().items():
                metrics[f"data/rejected/{reason}"] = float(count)
        pl_module.log_dict(metrics, prog_bar=False, rank_zero_only=True)
        pl_module.log("tok/s", metrics["perf/tokens_per_s"], prog_bar=True, rank_zero_only=True)
        if "perf/mfu" in metrics:
            pl_module.log("mfu", metrics["perf/mfu"], prog_bar=True, rank_zero_only=True)
        self._reset()
