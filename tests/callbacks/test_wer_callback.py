"""WERMonitor: decodes the validation sets every N steps, logs WER, audio and text examples to TensorBoard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aero_lightning.callbacks import wer as wer_module
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
    trainer = SimpleNamespace(
        global_step=0,
        is_global_zero=True,
        global_rank=0,
        world_size=1,
        loggers=[tb],
        strategy=SimpleNamespace(),
    )
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


def _trainer(rank: int, world: int, strategy=None, step: int = 1):
    return SimpleNamespace(
        global_step=step,
        is_global_zero=rank == 0,
        global_rank=rank,
        world_size=world,
        loggers=[],
        strategy=strategy or SimpleNamespace(),
    )


def test_ranks_decode_their_share_and_rank_0_scores_all(model, val_dir, monkeypatch):
    """Two ranks, simulated in one process: rank 1's hypotheses reach rank 0 through the gather, and the result is
    the single-process decode's."""
    kwargs = {"every_n_train_steps": 1, "max_samples": 3, "generation": {"max_new_tokens": 6}}
    module = SimpleNamespace(model=model.eval())
    alone = WERMonitor({"v": str(val_dir)}, **kwargs)
    alone.on_train_batch_end(_trainer(0, 1), module, None, None, 0)

    shares = {}

    def gather_as(rank):
        def gather(obj):
            shares[rank] = obj
            return [shares.get(0, {}), shares.get(1, {})]

        return gather

    monkeypatch.setattr(wer_module, "gather_objects", gather_as(1))
    second = WERMonitor({"v": str(val_dir)}, **kwargs)
    second.on_train_batch_end(_trainer(1, 2), module, None, None, 0)
    assert sorted(shares[1]) == [1] and second.last_results == {}  # rank 1 decoded utterance 1 only
    monkeypatch.setattr(wer_module, "gather_objects", gather_as(0))
    first = WERMonitor({"v": str(val_dir)}, **kwargs)
    first.on_train_batch_end(_trainer(0, 2), module, None, None, 0)
    assert sorted(shares[0]) == [0, 2]
    assert first.last_results == alone.last_results and alone.last_results["v"]["num_samples"] == 3


def test_sharded_ranks_run_equal_synced_generate_calls(model, val_dir, monkeypatch):
    """With sharded parameters each rank pads its share with repeats to the same count and generates with
    synced_gpus; the repeats are not scored."""
    calls = []

    def fake_decode(model, waveforms, prompt, options, cpt, synced_gpus=False):
        calls.append((len(waveforms), synced_gpus))
        return [SimpleNamespace(text="x") for _ in waveforms]

    class FSDPStrategy:  # the class name is what identifies a sharding strategy
        pass

    monkeypatch.setattr(wer_module, "decode_waveforms", fake_decode)
    monkeypatch.setattr(wer_module, "gather_objects", lambda obj: [obj])
    callback = WERMonitor({"v": str(val_dir)}, every_n_train_steps=1, max_samples=3, batch_size=8)
    callback.on_train_batch_end(_trainer(1, 2, FSDPStrategy()), SimpleNamespace(model=model), None, None, 0)
    assert calls == [(2, True)]  # rank 1 of 2 owns utterance 1 of 3, padded to ceil(3 / 2) = 2
    calls.clear()
    callback.on_train_batch_end(_trainer(1, 2, step=2), SimpleNamespace(model=model), None, None, 0)
    assert calls == [(1, False)]  # DDP: no padding, no synced generation
    assert WERMonitor(every_n_train_steps=0).every_n_train_steps == 0  # off by default in conf/callbacks
