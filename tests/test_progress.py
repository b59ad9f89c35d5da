"""Progress lines: the shared Progress helper and the training progress callback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aero_lightning.callbacks.progress import TrainingProgress
from aero_lightning.progress import Progress, format_duration


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_format_duration():
    assert [format_duration(s) for s in (4.2, 65, 3725.2, -1, float("nan"))] == [
        "4s",
        "1m05s",
        "1h02m05s",
        "?",
        "?",
    ]


def test_progress_logs_a_line_per_interval_with_rate_and_eta_when_not_a_terminal():
    clock, lines = Clock(), []
    with Progress(
        100, "demo/train", unit="utt", interval_s=30, log=lines.append, terminal=False, clock=clock
    ) as p:
        for _ in range(10):
            clock.t += 4
            p.update(5)  # 1.25 utt/s
    assert lines == [
        "demo/train: 40/100 (40 %), 1.2 utt/s, elapsed 32s, ETA 48s",
        "demo/train: 50/100 (50 %), 1.2 utt/s, elapsed 40s, ETA 40s (done)",
    ]
    assert p.line().startswith("demo/train: 50/100")


def test_progress_without_total_and_disabled():
    clock, lines = Clock(), []
    p = Progress(None, "decode", interval_s=1, log=lines.append, terminal=False, clock=clock)
    clock.t += 2
    p.update(3, postfix="WER 12.0 %")
    assert lines == ["decode: 3, 1.5 item/s, elapsed 2s, WER 12.0 %"]
    quiet = Progress(5, "x", log=lines.append, terminal=False, enabled=False)
    quiet.update(5)
    quiet.close()
    assert len(lines) == 1


def test_training_progress_line_every_n_optimizer_steps():
    clock = Clock()
    callback = TrainingProgress(every_n_train_steps=2, clock=clock)
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=10,
        is_global_zero=True,
        callback_metrics={
            "train/loss": torch.tensor(2.5),
            "train/ctc_loss": torch.tensor(1.25),
            "val/x/loss": 3,
        },
    )
    callback.on_train_start(trainer, None)
    batch = {"input_ids": torch.zeros(1, 300), "audio_samples": torch.tensor([16_000, 32_000])}
    for step in (1, 2, 2, 3, 4):  # step 2 twice: a second micro-batch of the same optimizer step
        clock.t += 10
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, batch, 0)
    assert callback.lines == [
        "step 2/10 (20 %) | ctc_loss 1.250 | loss 2.500 | 30 tok/s | 0.3 audio s/s | elapsed 20s | ETA 1m20s",
        "step 4/10 (40 %) | ctc_loss 1.250 | loss 2.500 | 30 tok/s | 0.3 audio s/s | elapsed 50s | ETA 1m30s",
    ]


def test_training_progress_rejects_a_negative_interval():
    with pytest.raises(ValueError, match=">= 0"):
        TrainingProgress(every_n_train_steps=-1)
