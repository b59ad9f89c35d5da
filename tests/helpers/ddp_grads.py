"""Script for tests/test_loss_normalisation.py: one optimizer step of the tiny model under Lightning, gradients saved.

``python tests/helpers/ddp_grads.py TINY_DIR OUT.pt WORLD MICRO ACCUM [LOSS]``: the 4 documents of
:func:`documents` are split over ``WORLD`` DDP processes (gloo, CPU), each rank training ``MICRO`` documents per
micro-batch with ``ACCUM`` accumulation steps. ``LOSS`` is a key of :data:`LOSSES`: the LM loss alone (default),
LM + auxiliary CTC, or CTC alone (encoder pre-training). Rank 0 writes the gradients seen before the optimizer step.
Lightning's DDP launcher re-executes this file once per extra rank (``LOCAL_RANK`` set).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

from aero_lightning.data.chat import asr_messages, encode_chat
from aero_lightning.data.datamodule import AccumulationGroups
from aero_lightning.data.packing import collate_packed
from aero_lightning.lit_module import AeroLitModule
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.build import build_aero_model
from aero_lightning.model.projector import MLPStackProjector

DURATIONS_S = [0.5, 2.5, 1.0, 3.0]
TEXTS = ["hello", "the cat sat on the mat with the lazy dog", "sea shells", "a quick brown fox jumps over it"]


LOSSES = {"lm": {}, "lm_ctc": {"ctc_weight": 0.5}, "ctc_only": {"ctc_weight": 1.0, "ctc_only": True}}
"""Model settings of each loss the normalisation tests check."""


def build_model(tiny_dir: Path, **model_kwargs) -> AeroModel:
    """The tiny model with a projector (and CTC head) seeded identically in every process."""
    torch.manual_seed(0)
    return build_aero_model(
        encoder={"name_or_path": str(tiny_dir / "encoder")},
        llm={"name_or_path": str(tiny_dir / "llm")},
        projector=functools.partial(MLPStackProjector, stack_factor=4, hidden_dim=128),
        attn_implementation="varlen",
        **model_kwargs,
    )


def documents(model: AeroModel) -> list[dict]:
    """Four pre-tokenised documents of different audio and reply lengths (so per-batch means differ)."""
    counter = model.audio_token_counter()
    rng = np.random.default_rng(0)
    docs = []
    for i, (seconds, text) in enumerate(zip(DURATIONS_S, TEXTS)):
        wave = (0.1 * rng.standard_normal(round(seconds * 16000))).astype(np.float32)
        messages = asr_messages(text)
        enc = encode_chat(model.tokenizer, messages, [counter(len(wave))])
        docs.append(
            {
                "key": f"d{i}",
                "waveform": wave,
                "messages": messages,
                "input_ids": enc.input_ids,
                "labels": enc.labels,
            }
        )
    return docs


class GradCapture(L.Callback):
    """Keeps the gradients of the trainable parameters right before the optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}
        self.loss_sum = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {
            n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }


class _Iterable:
    """A list of batches as one dataloader (a bare list would be read as a list of dataloaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def run(
    tiny_dir: Path,
    world: int,
    micro: int,
    accum: int,
    rank: int = 0,
    grouped: bool = True,
    strategy="auto",
    loss: str = "lm",
):
    """One optimizer step; returns the captured gradients of this rank."""
    model = build_model(tiny_dir, **LOSSES[loss])
    docs = documents(model)
    mine = docs[rank * len(docs) // world : (rank + 1) * len(docs) // world]
    batches = [
        collate_packed(mine[i : i + micro], model.audio_token_counter()) for i in range(0, len(mine), micro)
    ]
    assert len(batches) == accum, (len(batches), accum)
    capture = GradCapture()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=1,
        accumulate_grad_batches=accum,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture],
        use_distributed_sampler=False,
    )
    ids = (model.audio_token_id, model.end_of_turn_id)
    loader = AccumulationGroups(batches, accum, ctc_token_ids=ids) if grouped else _Iterable(batches)
    trainer.fit(AeroLitModule(model, lr=0.0, warmup_steps=0), train_dataloaders=loader)
    return capture.grads


if __name__ == "__main__":
    tiny, out, world, micro, accum = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:6])
    loss = sys.argv[6] if len(sys.argv) > 6 else "lm"
    rank = int(os.environ.get("LOCAL_RANK", 0))
    grads = run(tiny, world, micro, accum, rank=rank, strategy="ddp" if world > 1 else "auto", loss=loss)
    if rank == 0:
        torch.save(grads, out)
