"""WERMonitor: decodes the validation sets every N steps, logs WER, audio and text examples to TensorBoard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aero_lightning.callbacks.wer import WERMonitor
from aero_lightning.data.synth import build_demo_corpus


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(corpus, num_train=2, num_val=3, num_test=1, seed=0, shard_size=2, progress=False)
    return corpus / "validation"


def test_wer_is_logged_every_n_steps_with_examples(model, val_dir, tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="", version="")
    callback = WERMonitor({"demo_espeak": str(val_dir)}, every_n_train_steps=2, max_samples=2, num_examples=1,
                          generation={"max_new_tokens": 4})  # fmt: skip
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[tb], strategy=SimpleNamespace())
    module = SimpleNamespace(model=model.train())
    for step in (0, 1, 2, 2, 3):  # fires once, at step 2 (twice at step 2 under gradient accumulation: once)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, 0)
    assert model.training  # train mode restored
    result = callback.last_results["demo_espeak"]
    assert result["num_samples"] == 2 and result["wer"] > 0
    tb.experiment.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"audio": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "val/demo_espeak/wer" in tags["scalars"]
    assert [e.step for e in events.Scalars("val/demo_espeak/wer")] == [2]
    assert "wer_examples/demo_espeak/0" in tags["audio"]
    assert any("wer_examples/demo_espeak" in t for t in tags["tensors"])  # add_text is stored as a tensor


def test_sharded_strategies_and_other_ranks_skip(model, val_dir, caplog):
    callback = WERMonitor({"v": str(val_dir)}, every_n_train_steps=1, max_samples=1)
    module = SimpleNamespace(model=model)
    other_rank = SimpleNamespace(global_step=1, is_global_zero=False, loggers=[], strategy=SimpleNamespace())
    callback.on_train_batch_end(other_rank, module, None, None, 0)
    assert callback.last_results == {}

    class FSDPStrategy:  # the name is what the check looks at
        pass

    sharded = SimpleNamespace(global_step=2, is_global_zero=True, loggers=[], strategy=FSDPStrategy())
    callback.on_train_batch_end(sharded, module, None, None, 0)
    assert callback.last_results == {} and "sharded" in caplog.text
    assert WERMonitor(every_n_train_steps=0).every_n_train_steps == 0  # off by default in conf/callbacks
