"""Test-only Lightning callback, added with ``+callbacks.recorder._target_=helpers.batch_recorder.BatchRecorder`` (``tests/`` on
``PYTHONPATH``).

It appends ``{"step": global_step, "keys": [...]}`` of every training batch to a JSONL file, and can send a signal
to its own process group after a given optimizer step, the way SLURM signals every process of a job step.
"""

from __future__ import annotations

import json
import os
import signal

import lightning as L


class BatchRecorder(L.Callback):
    """Record training batch keys; optionally signal the process group once.

    Args:
        path: JSONL file (appended).
        signal_at_step: after the optimizer step that makes ``trainer.global_step`` equal this, send ``signal_name``
            to the process group (None: never).
        signal_name: e.g. ``"SIGUSR1"``.
    """

    def __init__(self, path: str, signal_at_step: int | None = None, signal_name: str = "SIGUSR1"):
        self.path = path
        self.signal_at_step = signal_at_step
        self.signal = signal.Signals[signal_name]
        self._sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": list(batch["keys"])}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._sent and self.signal_at_step is not None and trainer.global_step == self.signal_at_step:
            self._sent = True
            os.killpg(os.getpgrp(), self.signal)
