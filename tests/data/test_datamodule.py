"""AsrCollator padding and windows, split resolution errors, and the eval sample reader's rejections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.chat import IGNORE_INDEX
from aero_lightning.data.datamodule import AsrCollator, resolve_split
from aero_lightning.data.features import pcm_windows
from aero_lightning.data.packing import to_pcm16
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import read_sample
from aero_lightning.data.shards import asr_sample_json, build_manifest, encode_flac, write_manifest

COUNTER = AudioTokenCounter(encoder_downsample=2, projector_downsample=4)


def _is_prefix_of_ones(row: torch.Tensor) -> bool:
    n = int(row.sum())
    return bool((row[:n] == 1).all() and (row[n:] == 0).all())


def _is_suffix_of_ones(row: torch.Tensor) -> bool:
    return _is_prefix_of_ones(row.flip(0))


def test_training_batch_is_right_padded(tokenizer, make_samples):
    samples = make_samples([0.7, 2.3, 5.0])
    batch = AsrCollator(tokenizer, COUNTER)(samples)
    batch_size, seq_len = batch["input_ids"].shape
    assert batch_size == 3
    assert batch["labels"].shape == batch["attention_mask"].shape == (batch_size, seq_len)
    assert all(_is_prefix_of_ones(row) for row in batch["attention_mask"])
    assert (batch["attention_mask"].sum(1) < seq_len).any()  # some padding exists
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert (batch["input_ids"] == audio_id).sum(1).tolist() == [COUNTER(len(s["waveform"])) for s in samples]
    assert (batch["labels"] != IGNORE_INDEX).sum(1).min() > 0
    assert batch["audio_samples"].tolist() == [len(s["waveform"]) for s in samples]
    assert batch["keys"] == ["utt0", "utt1", "utt2"]
    assert batch["references"] == [s["messages"][-1]["content"][0]["text"] for s in samples]
    assert batch["corpora"] == ["synthetic"] * 3


def test_generation_batch_is_left_padded(tokenizer, make_samples):
    samples = make_samples([0.7, 2.3, 5.0])
    batch = AsrCollator(tokenizer, COUNTER, for_generation=True)(samples)
    assert all(_is_suffix_of_ones(row) for row in batch["attention_mask"])
    assert (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()
    assert (batch["labels"] == IGNORE_INDEX).all()
    suffix = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert (batch["input_ids"][:, -len(suffix) :] == torch.tensor(suffix)).all()
    for row, sample in zip(batch["input_ids"], samples):  # the reply is not in the prompt
        assert sample["messages"][-1]["content"][0]["text"] not in tokenizer.decode(row)
    assert batch["references"][1] == samples[1]["messages"][-1]["content"][0]["text"]


def test_long_clip_is_cut_into_ordered_windows(tokenizer, make_samples):
    samples = make_samples([0.5, 31.0])
    batch = AsrCollator(tokenizer, COUNTER)(samples)
    assert batch["window_lengths"].tolist() == [8000, 480_000, 16_000]
    pcm = batch["audio_pcm"]  # windows back to back as 16-bit PCM, no padding
    assert pcm.shape == (8000 + 31 * 16000,) and pcm.dtype == torch.int16
    expected = np.concatenate([to_pcm16(samples[0]["waveform"]), to_pcm16(samples[1]["waveform"])])
    assert torch.equal(pcm, torch.from_numpy(expected))
    audio = pcm_windows(pcm, batch["window_lengths"])  # (W, N) float32 on the model's side
    assert audio.shape == (3, 480_000) and audio.dtype == torch.float32
    long = torch.from_numpy(to_pcm16(samples[1]["waveform"])).float() / 32768
    assert torch.equal(audio[0, :8000], torch.from_numpy(to_pcm16(samples[0]["waveform"])).float() / 32768)
    assert torch.equal(audio[1], long[:480_000])
    assert torch.equal(audio[2, :16_000], long[480_000:])
    assert (audio[0, 8000:] == 0).all() and (audio[2, 16_000:] == 0).all()
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert (
        int((batch["input_ids"][1] == audio_id).sum()) == 375 + 13
    )  # 30 s window + 1 s (100 frames -> 50 -> 13)


# ---------------------------------------------------------------------------------------------- splits


def test_resolve_split_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="aero_lightning.data.synth"):
        resolve_split(tmp_path / "nope")


def test_resolve_split_folder_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="aero_lightning.data.synth"):
        resolve_split(tmp_path)


def test_resolve_split_empty_manifest(tmp_path):
    write_manifest(tmp_path, build_manifest(corpus="c", split="train", shards=[], durations_s=[]))
    with pytest.raises(ValueError, match="no shards"):
        resolve_split(tmp_path)


def test_resolve_split_missing_shard(tmp_path):
    shards = [{"name": "c-000000.tar", "num_samples": 1, "duration_s": 1.0}]
    write_manifest(tmp_path, build_manifest(corpus="c", split="train", shards=shards, durations_s=[1.0]))
    with pytest.raises(ValueError, match="missing"):
        resolve_split(tmp_path)
    (tmp_path / "c-000000.tar").write_bytes(b"")
    assert resolve_split(tmp_path) == [str((tmp_path / "c-000000.tar").resolve())]


# --------------------------------------------------------------------------------------------- decoder


def _raw(
    key: str = "k", seconds: float = 1.0, sample_rate: int = 16000, text: str = "hello world", **overrides
):
    wave = (0.1 * np.sin(np.arange(int(seconds * sample_rate)) / 7.0)).astype(np.float32)
    record = asr_sample_json(corpus="c", text=text, duration_s=seconds, source="test")
    raw = {"__key__": key, "flac": encode_flac(wave, sample_rate), "json": json.dumps(record).encode()}
    raw.update(overrides)
    return raw


def test_read_sample_accepts_valid_sample():
    rejects = RejectCounter()
    sample = read_sample(_raw(seconds=1.5), rejects, max_duration_s=10.0)
    assert sample is not None
    assert sample["key"] == "k" and sample["corpus"] == "c"
    assert sample["waveform"].dtype == np.float32 and sample["waveform"].shape == (24_000,)
    assert sample["duration_s"] == pytest.approx(1.5)
    assert sample["messages"][-1]["content"][0]["text"] == "hello world"
    assert not rejects


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_raw(json=b"{not json"), "bad_json"),
        (_raw(json=b"\xff\xfe\x00garbage"), "bad_json"),
        (_raw(flac=b"fLaC" + b"\x00" * 64), "corrupt_audio"),
        (_raw(flac=b""), "corrupt_audio"),
        (_raw(sample_rate=8000), "sample_rate"),
        (_raw(text=""), "empty_text"),
        (_raw(text="   "), "empty_text"),
        (_raw(seconds=12.0), "too_long"),
        ({k: v for k, v in _raw().items() if k != "flac"}, "missing_member"),
        ({"__key__": "k", "flac": _raw()["flac"]}, "missing_member"),
    ],
    ids=[
        "bad_json",
        "bad_utf8",
        "corrupt_flac",
        "empty_flac",
        "8khz",
        "empty_text",
        "blank_text",
        "too_long",
        "no_flac",
        "no_json",
    ],
)
def test_read_sample_skips_and_counts(raw, reason):
    rejects = RejectCounter()
    assert read_sample(raw, rejects, max_duration_s=10.0) is None
    assert rejects == {reason: 1}
    assert read_sample(raw, rejects, max_duration_s=10.0) is None
    assert rejects[reason] == 2


def test_read_sample_counts_across_reasons():
    rejects = RejectCounter()
    results = [
        read_sample(r, rejects, max_duration_s=10.0)
        for r in (_raw(json=b"x"), _raw(text=""), _raw(), _raw(json=b"y"), _raw(seconds=11.0))
    ]
    assert [r is None for r in results] == [True, True, False, True, True]
    assert dict(rejects) == {"bad_json": 2, "empty_text": 1, "too_long": 1}
