"""Text-only and several-clip conversations through the shard reader, the collators and the model."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from aero_lightning.data.chat import IGNORE_INDEX, asr_messages, encode_chat
from aero_lightning.data.packing import collate_packed, collate_padded
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import iter_tar, read_sample
from aero_lightning.data.shards import ShardWriter, encode_flac

SR = 16000


def _wave(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)


def _text_messages(question: str, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _two_clip_messages() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "first clip"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "and this one"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ]


def test_shards_hold_text_only_and_several_clip_samples(tmp_path):
    clips = [_wave(0.5, 1), _wave(1.25, 2)]
    with ShardWriter(tmp_path, "mixed", 10) as writer:
        writer.write(
            "chat", None, {"duration_s": 0.0, "task": "text", "messages": _text_messages("2 plus 2?", "4")}
        )
        writer.write(
            "two",
            [encode_flac(c) for c in clips],
            {
                "duration_s": 1.75,
                "audio_durations_s": [0.5, 1.25],
                "task": "aqa",
                "messages": _two_clip_messages(),
            },
        )
        with pytest.raises(ValueError, match="audio_durations_s"):
            writer.write("bad", [encode_flac(c) for c in clips], {"duration_s": 1.75, "messages": []})
    with tarfile.open(tmp_path / "mixed-000000.tar") as tar:
        assert tar.getnames() == ["chat.json", "two.0.flac", "two.1.flac", "two.json"]
    rejects = RejectCounter()
    samples = [read_sample(raw, rejects) for raw in iter_tar(str(tmp_path / "mixed-000000.tar"), rejects)]
    assert not rejects
    text, two = samples
    assert text["waveforms"] == [] and "waveform" not in text and text["task"] == "text"
    assert [len(c) for c in two["waveforms"]] == [8000, 20000] and two["task"] == "aqa"
    assert np.allclose(two["waveforms"][1], clips[1], atol=1 / 32768)


def test_clip_count_must_match_the_audio_parts(tmp_path):
    raw = {
        "__key__": "k",
        "json": json.dumps(
            {"duration_s": 0.5, "messages": _two_clip_messages(), "audio_durations_s": [0.5]}
        ).encode(),
        "0.flac": encode_flac(_wave(0.5, 0)),
    }
    rejects = RejectCounter()
    assert read_sample(raw, rejects) is None and rejects == {"missing_member": 1}


def _encode(tokenizer, counter, messages, clips, key):
    enc = encode_chat(tokenizer, messages, [counter(len(c)) for c in clips])
    return {
        "key": key,
        "messages": messages,
        "waveforms": clips,
        "input_ids": enc.input_ids,
        "labels": enc.labels,
    }


def test_labels_cover_every_assistant_turn_of_a_two_clip_conversation(tokenizer, model):
    counter = model.audio_token_counter()
    doc = _encode(tokenizer, counter, _two_clip_messages(), [_wave(0.5, 1), _wave(1.25, 2)], "two")
    labelled = tokenizer.decode([t for t, lab in zip(doc["input_ids"], doc["labels"]) if lab != IGNORE_INDEX])
    assert labelled == "one<|im_end|>two<|im_end|>"
    slots = doc["input_ids"].count(model.audio_token_id)
    assert slots == counter(8000) + counter(20000)


def test_text_only_documents_pack_with_audio_documents_and_keep_their_loss(tokenizer, model):
    """A packed row of [audio, text-only, two-clip] documents: each document's loss equals the document alone, and
    a text-only batch trains without an encoder call."""
    counter = model.audio_token_counter()
    docs = [
        _encode(tokenizer, counter, asr_messages("the cat sat"), [_wave(0.9, 3)], "asr"),
        _encode(tokenizer, counter, _text_messages("say hi", "hi there"), [], "text"),
        _encode(tokenizer, counter, _two_clip_messages(), [_wave(0.5, 1), _wave(1.25, 2)], "two"),
    ]
    model.eval()
    with torch.no_grad():
        packed = model.forward_batch(collate_packed(docs, counter))
        alone = [model.forward_batch(collate_padded([d], counter, tokenizer.pad_token_id)) for d in docs]
    assert int(packed.num_target_tokens) == sum(int(a.num_target_tokens) for a in alone)
    torch.testing.assert_close(packed.loss_sum, sum(a.loss_sum for a in alone), rtol=1e-5, atol=1e-5)
    text_batch = collate_packed([docs[1]], counter)
    assert text_batch["audio_pcm"].numel() == 0 and text_batch["window_lengths"].numel() == 0
    calls = []
    handle = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out = model.forward_batch(text_batch)
    finally:
        handle.remove()
    assert calls == [] and torch.isfinite(out.loss_sum)
    torch.testing.assert_close(out.loss_sum, alone[1].loss_sum, rtol=1e-5, atol=1e-5)


def test_training_loss_is_logged_per_task_and_per_corpus(tokenizer, model):
    """The breakdown equals each task's documents run alone (sum of their token losses / their targets)."""
    from aero_lightning.lit_module import AeroLitModule

    counter = model.audio_token_counter()
    docs = [
        _encode(tokenizer, counter, asr_messages("the cat sat"), [_wave(0.9, 3)], "a1")
        | {"task": "asr", "corpus": "x"},
        _encode(tokenizer, counter, _text_messages("say hi", "hi there"), [], "t")
        | {"task": "text", "corpus": "y"},
        _encode(tokenizer, counter, asr_messages("a dog"), [_wave(0.6, 4)], "a2")
        | {"task": "asr", "corpus": "y"},
    ]
    module = AeroLitModule(model)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.eval()
    with torch.no_grad():
        out = model.forward_batch(collate_packed(docs, counter))
        alone = [model.forward_batch(collate_padded([d], counter, tokenizer.pad_token_id)) for d in docs]
    module._log_breakdown(out, collate_packed(docs, counter))

    def mean(idx):
        return sum(float(alone[i].loss_sum) for i in idx) / sum(int(alone[i].num_target_tokens) for i in idx)

    assert logged["train/task/asr/loss"] == pytest.approx(mean([0, 2]), rel=1e-5)
    assert logged["train/task/text/loss"] == pytest.approx(mean([1]), rel=1e-5)
    assert logged["train/corpus/y/loss"] == pytest.approx(mean([1, 2]), rel=1e-5)
    assert logged["train/task/asr/target_tokens"] == int(alone[0].num_target_tokens) + int(
        alone[2].num_target_tokens
    )
    assert sorted(logged) == sorted(
        f"train/{k}/{n}/{m}"
        for k, n in [("task", "asr"), ("task", "text"), ("corpus", "x"), ("corpus", "y")]
        for m in ("loss", "target_tokens")
    )
