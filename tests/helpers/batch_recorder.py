"""Test-only Lightning callback, added with ``+callbacks.recorder._target_=helpers.batch_recorder.BatchRecorder`` (``tests/`` on
``PYTHONPATH``).

It appends ``{"step": global_step, "rank": global rank, "keys": [...]}`` of every training batch to a JSONL file,
and can send a signal to its own process group once, the way SLURM signals every process of a job step: either
between two optimizer steps, or in the middle of a backward pass.
"""

from __future__ import annotations

import json
import os
import signal

import lightning as L


class BatchRecorder(L.Callback):
    """Record training batch keys; optionally signal the process group once.

    Args:
        path: JSONL file (appended); ``{rank}`` in it is replaced by the global rank (one file per rank).
        signal_at_step: after the optimizer step that makes ``trainer.global_step`` equal this, send ``signal_name``
            to the process group (None: never).
        signal_in_backward_at_step: during the backward pass of the first micro-batch trained at this
            ``trainer.global_step`` (the one that leads to optimizer step ``N + 1``), send ``signal_name``: from a
            gradient hook on the module's first trainable parameter (input side, so autograd reaches it late in the
            pass: under DDP some gradient buckets are already being all-reduced when the signal arrives; None:
            never).
        signal_name: e.g. ``"SIGUSR1"``.
        signal_rank: the global rank that sends (SLURM sends once, to every task; one sender reaches all of them
            through the process group).
    """

    def __init__(
        self,
        path: str,
        signal_at_step: int | None = None,
        signal_in_backward_at_step: int | None = None,
        signal_name: str = "SIGUSR1",
        signal_rank: int = 0,
    ):
        self.path = path
        self.signal_at_step = signal_at_step
        self.signal_in_backward_at_step = signal_in_backward_at_step
        self.signal = signal.Signals[signal_name]
        self.signal_rank = signal_rank
        self._sent = False
        self._hook = None

    def _send(self) -> None:
        self._sent = True
        os.killpg(os.getpgrp(), self.signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "keys": list(batch["keys"])}
        with open(self.path.format(rank=trainer.global_rank), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if (
            self._sent
            or self._hook is not None
            or trainer.global_rank != self.signal_rank
            or trainer.global_step != self.signal_in_backward_at_step
        ):
            return
        param = next(p for p in pl_module.parameters() if p.requires_grad)

        def send_once(grad):
            if not self._sent:
                self._send()  # the process's own handler runs here, inside loss.backward()
            return grad

        self._hook = param.register_hook(send_once)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (
            not self._sent
            and trainer.global_rank == self.signal_rank
            and self.signal_at_step is not None
            and trainer.global_step == self.signal_at_step
        ):
            self._send()
