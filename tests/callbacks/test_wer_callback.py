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


# ------------------------------------------------------------------------------------- per-task validation
def _mixed_val_set(folder):
    """A validation set mixing tasks: ASR, captions (two clips, <key>_c<i> samples), classification, a two-clip
    question and a text-only chat sample (not decoded)."""
    import numpy as np

    from aero_lightning.data.shards import ShardWriter, build_manifest, encode_flac, write_manifest

    def wave(seconds, seed):
        return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * 16000))).astype(np.float32)

    def chat(parts, reply):
        return [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]},
        ]

    audio, describe = {"type": "audio"}, {"type": "text", "text": "Describe the audio."}
    samples = [
        ("u1", [wave(0.5, 0)], "asr", chat([audio, {"type": "text", "text": "Transcribe."}], "a dog barks")),
        ("c1_c1", [wave(0.6, 1)], "caption", chat([audio, describe], "a dog barks")),
        ("c1_c2", [wave(0.6, 1)], "caption", chat([audio, describe], "a loud dog barking")),
        ("c2_c1", [wave(0.7, 2)], "caption", chat([audio, describe], "rain falls on a roof")),
        ("k1", [wave(0.4, 3)], "classify", chat([audio, {"type": "text", "text": "Which animal?"}], "dog")),
        ("k2", [wave(0.4, 4)], "classify", chat([audio, {"type": "text", "text": "Which animal?"}], "cat")),
        ("q1", [wave(0.3, 5), wave(0.2, 6)], "aqa",
         chat([audio, audio, {"type": "text", "text": "Which clip is longer?"}], "the first")),
        ("t1", [], "text", chat([{"type": "text", "text": "2 plus 2?"}], "4")),
    ]  # fmt: skip
    durations = []
    with ShardWriter(folder, "val", 20) as writer:
        for key, clips, task, messages in samples:
            meta = {"duration_s": sum(len(c) for c in clips) / 16000, "task": task, "messages": messages}
            if len(clips) > 1:
                meta["audio_durations_s"] = [len(c) / 16000 for c in clips]
            writer.write(key, [encode_flac(c) for c in clips], meta)
            durations.append(meta["duration_s"])
    write_manifest(
        folder,
        build_manifest(corpus="mixed", split="validation", shards=writer.shards, durations_s=durations),
    )
    return folder


REPLIES = {"Transcribe.": "a dog barks", "Which clip is longer?": "first"}


def test_mixed_set_is_scored_per_task_with_each_sample_prompt(model, tmp_path, monkeypatch):
    from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
    from aero_lightning.metrics.caption import caption_scores

    folder = _mixed_val_set(tmp_path / "val")
    seen = []

    def fake_decode(model, waveforms, prompts, options, cpt, synced_gpus=False):
        out = []
        for wave, prompt in zip(waveforms, prompts):
            seen.append((prompt, wave))
            if isinstance(prompt, str):
                text = "a dog barks"  # the ASR prompt
            else:
                asked = prompt[-1]["content"][-1].get("text", "")
                n_clips = sum(p.get("type") == "audio" for p in prompt[-1]["content"])
                text = REPLIES.get(asked, "it is a dog" if asked == "Which animal?" else "a dog is barking")
                assert n_clips == (len(wave) if isinstance(wave, list) else 1)
            out.append(SimpleNamespace(text=text))
        return out

    monkeypatch.setattr(wer_module, "decode_waveforms", fake_decode)
    monkeypatch.setattr(wer_module, "gather_objects", lambda obj: [obj])
    callback = WERMonitor({"mixed": str(folder)}, every_n_train_steps=1, max_samples=16)
    callback.on_train_batch_end(_trainer(0, 1), SimpleNamespace(model=model), None, None, 0)
    r = callback.last_results["mixed"]
    # the text-only sample is not decoded: 1 ASR + 2 caption clips + 2 classify + 1 two-clip question = 6
    assert len(seen) == 6 and r["num_samples"] == 6
    assert [p for p, _ in seen if isinstance(p, str)] == [DEFAULT_ASR_PROMPT]
    assert r["asr/wer"] == 0.0 and r["asr/num_samples"] == 1
    # classify: "it is a dog" names "dog" (right for k1, wrong for k2) -> 1/2
    assert r["classify/accuracy"] == 0.5 and r["classify/num_samples"] == 2
    # the two-clip question: "first" vs "the first" is an exact match once the article is dropped
    assert r["aqa/exact_match"] == 1.0 and r["aqa/f1"] == 1.0
    expected = caption_scores(
        ["a dog is barking"] * 2,
        [["a dog barks", "a loud dog barking"], ["rain falls on a roof"]],
        ("cider_d",),
    )  # the two clips, c1 with both of its captions
    assert r["caption/num_samples"] == 2
    assert r["caption/cider_d"] == pytest.approx(expected.scores.get("cider_d", r["caption/f1"]))


def test_non_asr_set_decodes_for_real_with_its_own_messages(model, tmp_path):
    folder = _mixed_val_set(tmp_path / "val")
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="", version="")
    callback = WERMonitor({"mixed": str(folder)}, every_n_train_steps=1, max_samples=16, num_examples=2,
                          generation={"max_new_tokens": 3})  # fmt: skip
    trainer = _trainer(0, 1)
    trainer.loggers = [tb]
    callback.on_train_batch_end(trainer, SimpleNamespace(model=model), None, None, 0)
    r = callback.last_results["mixed"]
    assert {"asr/wer", "classify/accuracy", "aqa/f1", "aqa/exact_match"} <= set(r)
    assert "caption/cider_d" in r or "caption/f1" in r
    tb.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"val/mixed/asr/wer", "val/mixed/classify/accuracy", "val/mixed/aqa/f1"} <= set(
        events.Tags()["scalars"]
    )
