"""Script for tests/test_distributed_eval.py: validation loss, the WER callback and the test decode of the tiny model
on the demo corpus, under a distributed strategy on CPU, with the weights left unchanged (learning rate 0).

``python tests/helpers/dist_eval.py TINY_DIR CORPUS_DIR OUT.pt STRATEGY WORLD``: ``STRATEGY`` is ``auto`` (one
process), ``ddp`` or ``fsdp2``. One optimizer step at learning rate 0, then validation (loss and WER of the
validation split) and the test decode. Rank 0 writes ``{"val_loss", "val_wer", "test_wer", "test_records"}``.
Lightning's launcher re-executes this file once per extra rank (``LOCAL_RANK`` set).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script, one process per rank
from aero_lightning.callbacks.wer import WERMonitor  # noqa: E402
from aero_lightning.data.datamodule import AeroDataModule  # noqa: E402
from aero_lightning.lit_module import AeroLitModule  # noqa: E402
from aero_lightning.strategies import FSDP2AeroLitModule, FSDP2Strategy  # noqa: E402
from helpers.ddp_grads import build_model  # noqa: E402


def run(tiny_dir: Path, corpus: Path, strategy: str, world: int, out_dir: Path) -> dict:
    model = build_model(tiny_dir)
    module_cls = FSDP2AeroLitModule if strategy == "fsdp2" else AeroLitModule
    module = module_cls(
        model, lr=0.0, warmup_steps=0, weight_decay=0.0, max_new_tokens=8, predictions_dir=str(out_dir)
    )
    data = AeroDataModule(
        train={"demo": {"dir": str(corpus / "train"), "weight": 1.0}},
        val_dirs={"v": str(corpus / "validation")},
        test_dir=str(corpus / "test"),
        packing={"mode": "packed", "packing_length": 768, "buffer_size": 8},
        eval_batch_size=2,
        num_workers=0,
    )
    data.bind_model(model.tokenizer, model.audio_token_counter(), model.end_of_turn_token)
    wer = WERMonitor(
        {"v": str(corpus / "validation")},
        every_n_train_steps=1,
        max_samples=5,
        batch_size=2,
        num_examples=0,
        generation={"max_new_tokens": 8},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=FSDP2Strategy() if strategy == "fsdp2" else strategy,
        max_steps=1,
        val_check_interval=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[wer],
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    val_loss = float(trainer.callback_metrics["val/v/loss"])
    trainer.test(module, datamodule=data)
    return {
        "val_loss": val_loss,
        "val_wer": wer.last_results.get("v"),
        "test_wer": module.test_metrics.get("wer"),
        "test_records": sorted((r["key"], r["hypothesis"]) for r in module.test_records),
    }


if __name__ == "__main__":
    tiny, corpus, out, strategy, world = (
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    torch.set_num_threads(1)
    result = run(tiny, corpus, strategy, world, Path(out).parent)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(result, out)
