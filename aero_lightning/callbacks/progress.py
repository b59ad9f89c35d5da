"""One progress line every N optimizer steps, in the run's log file and on the console.

Lightning's progress bar is for a terminal; a log file (``train.log``, ``nohup``, a SLURM job) needs a line it can
keep. Every ``every_n_train_steps`` optimizer steps rank 0 logs::

    step 250/500 (50 %) | loss 2.314 | ctc_loss 1.201 | 2391 tok/s | 78.2 audio s/s | elapsed 5m12s | ETA 5m10s

Losses are the last logged values (``train/*`` in ``trainer.callback_metrics``); tokens/s (real LLM tokens) and
audio s/s are this process's over the interval; the ETA assumes the interval's speed holds for the remaining steps.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from aero_lightning.data.audio_tokens import SAMPLE_RATE_HZ
from aero_lightning.progress import format_duration

logger = logging.getLogger(__name__)

__all__ = ["TrainingProgress"]


def real_tokens(batch: dict) -> int:
    """LLM positions that hold a token of a document (padding excluded) in a collated batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class TrainingProgress(L.Callback):
    """Log a progress line every ``every_n_train_steps`` optimizer steps (module docstring).

    Args:
        every_n_train_steps: steps between lines; 0 turns the callback off.
        clock: time source (seconds), for tests.

    Raises:
        ValueError: for a negative ``every_n_train_steps``.
    """

    def __init__(self, every_n_train_steps: int = 50, clock=time.monotonic):
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps = int(every_n_train_steps)
        self.clock = clock
        self.lines: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._mark = self.clock()
        self._start_step = self._mark_step = trainer.global_step
        self._tokens = 0
        self._audio_samples = 0
        self._last_logged = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_n_train_steps or not isinstance(batch, dict):
            return
        self._tokens += real_tokens(batch)
        samples = batch.get("audio_samples")
        if isinstance(samples, torch.Tensor):
            self._audio_samples += int(samples.sum())
        step = trainer.global_step
        if step == self._last_logged or step % self.every_n_train_steps:
            return  # not an optimizer-step boundary of the schedule (or accumulation within one)
        self._last_logged = step
        now = self.clock()
        interval = max(now - self._mark, 1e-9)
        steps_per_s = (step - self._mark_step) / interval
        parts = [
            f"step {step}"
            + (
                f"/{trainer.max_steps} ({100 * step / trainer.max_steps:.0f} %)"
                if trainer.max_steps and trainer.max_steps > 0
                else ""
            )
        ]
        metrics = trainer.callback_metrics
        # the step's losses (train/loss, train/ctc_loss), not the per-task and per-corpus breakdown
        for name in sorted(
            k for k in metrics if k.startswith("train/") and k.endswith("loss") and k.count("/") == 1
        ):
            parts.append(f"{name.removeprefix('train/')} {float(metrics[name]):.3f}")
        parts.append(f"{self._tokens / interval:.0f} tok/s")
        parts.append(f"{self._audio_samples / SAMPLE_RATE_HZ / interval:.1f} audio s/s")
        parts.append(f"elapsed {format_duration(now - self._start)}")
        if trainer.max_steps and trainer.max_steps > 0 and steps_per_s > 0:
            parts.append(f"ETA {format_duration((trainer.max_steps - step) / steps_per_s)}")
        line = " | ".join(parts)
        self._mark, self._mark_step, self._tokens, self._audio_samples = now, step, 0, 0
        if trainer.is_global_zero:
            self.lines.append(line)
            logger.info(line)
