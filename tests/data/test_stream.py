"""Training stream: bad input skipped and counted, mixture weights, budgets, exact resume."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
from lightning.pytorch.callbacks import ModelCheckpoint

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.datamodule import AeroDataModule
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import iter_tar
from aero_lightning.data.shards import asr_sample_json, build_manifest, write_manifest
from aero_lightning.data.stream import MixtureStream, TrainStream, mixture_probs
from aero_lightning.lit_module import AeroLitModule

COUNTER = AudioTokenCounter(encoder_downsample=2, projector_downsample=4)
SR = 16000


def _wave(seconds: float, seed: int, sr: int = SR, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (round(seconds * sr),) if channels == 1 else (round(seconds * sr), channels)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def _flac(wave: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _record(corpus: str, key: str, seconds: float, text: str | None = None) -> bytes:
    rec = asr_sample_json(
        corpus=corpus, text=text if text is not None else f"words of {key}", duration_s=seconds, source="test"
    )
    return json.dumps(rec).encode()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good(corpus: str, key: str, seconds: float, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.flac", _flac(_wave(seconds, seed))), (f"{key}.json", _record(corpus, key, seconds))]


def make_corpus(root: Path, corpus: str, shards: list[list[tuple[str, bytes]]]) -> Path:
    folder = root / corpus
    folder.mkdir(parents=True)
    entries = []
    for i, members in enumerate(shards):
        name = f"{corpus}-{i:06d}.tar"
        write_shard(folder / name, members)
        entries.append({"name": name, "num_samples": len(members) // 2, "duration_s": 1.0})
    n = sum(e["num_samples"] for e in entries)
    write_manifest(
        folder, build_manifest(corpus=corpus, split="train", shards=entries, durations_s=[1.0 / n * 1.0] * n)
    )
    return folder


def _urls(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def _stream(tokenizer, corpora, probs=None, **kw) -> TrainStream:
    probs = probs or {n: 1.0 / len(corpora) for n in corpora}
    kw = {"mode": "packed", "packing_length": 400, "buffer_size": 8, "seed": 3} | kw
    return TrainStream(corpora, probs, tokenizer, COUNTER, **kw)


# ----------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_skipped_with_counted_reasons(tokenizer, tmp_path):
    c = "mixed"
    members = good(c, "g0", 1.0, 0)
    members += [("corrupt.flac", b"fLaC" + b"\x00" * 80), ("corrupt.json", _record(c, "corrupt", 1.0))]
    members += good(c, "g1", 0.6, 1)
    members += [
        ("rate8k.flac", _flac(_wave(1.0, 2, sr=8000), 8000)),
        ("rate8k.json", _record(c, "rate8k", 1.0)),
    ]
    members += [("stereo.flac", _flac(_wave(1.0, 3, channels=2))), ("stereo.json", _record(c, "stereo", 1.0))]
    members += [("notext.flac", _flac(_wave(1.0, 4))), ("notext.json", _record(c, "notext", 1.0, text=""))]
    members += [("badjson.flac", _flac(_wave(1.0, 5))), ("badjson.json", b'{"duration_s": 1.0, "messa')]
    members += [("long.flac", _flac(_wave(40.0, 6))), ("long.json", _record(c, "long", 40.0))]  # > 400 tokens
    members += good(c, "g2", 1.4, 7)
    members += good(c, "g3", 0.9, 8)
    folder = make_corpus(tmp_path, c, [members])
    # one block = the 4 good samples + the 3 that fail only when decoded = exactly one pass over the shard
    stream = _stream(tokenizer, {c: _urls(folder)}, buffer_size=7)
    it = iter(stream)
    batches = []
    while not batches or batches[-1]["data_state"]["block"] == 0:
        batches.append(next(it))
    first_block = batches[:-1]
    keys = sorted(k for b in first_block for k in b["keys"])
    assert keys == ["g0", "g1", "g2", "g3"]
    assert first_block[-1]["data_state"]["rejects"] == {
        "corrupt_audio": 1,
        "sample_rate": 1,
        "not_mono": 1,
        "empty_text": 1,
        "bad_json": 1,
        "over_budget": 1,
    }
    # training goes on: later batches keep coming from the same shard
    more = list(islice(iter(stream), 5))
    assert all(set(b["keys"]) <= {"g0", "g1", "g2", "g3"} for b in more)


def test_truncated_tar_yields_complete_samples_and_counts(tmp_path):
    members = good("c", "a", 1.0, 0) + good("c", "b", 1.0, 1) + good("c", "c", 1.0, 2)
    path = tmp_path / "t.tar"
    write_shard(path, members)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    rejects = RejectCounter()
    keys = [s["__key__"] for s in iter_tar(str(path), rejects)]
    assert keys == ["a"]  # "b" may be cut mid-member: only whole samples before the damage are kept
    assert rejects == {"truncated_tar": 1}
    assert [s["__key__"] for s in iter_tar(str(tmp_path / "missing.tar"), rejects)] == []
    assert rejects == {"truncated_tar": 1, "unreadable_shard": 1}


def test_truncated_shard_in_training_stream(tokenizer, tmp_path):
    folder = make_corpus(
        tmp_path, "c", [good("c", "a", 1.0, 0) + good("c", "b", 1.0, 1) + good("c", "z", 1.0, 2)]
    )
    tar = next(folder.glob("*.tar"))
    tar.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * 0.7)])
    batch = next(iter(_stream(tokenizer, {"c": _urls(folder)}, buffer_size=3)))
    assert batch["data_state"]["rejects"]["truncated_tar"] >= 2  # the shard was drawn again after it broke
    assert set(batch["keys"]) == {"a"}


# --------------------------------------------------------------------------------------------- mixture


def test_mixture_probs_temperature():
    assert mixture_probs({"a": 3.0, "b": 1.0}) == pytest.approx({"a": 0.75, "b": 0.25})
    # T = 2: sqrt weights
    assert mixture_probs({"a": 9.0, "b": 1.0}, 2.0) == pytest.approx({"a": 0.75, "b": 0.25})
    assert mixture_probs({"a": 100.0, "b": 1.0}, 1e9) == pytest.approx({"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="weights"):
        mixture_probs({"a": 0.0})
    with pytest.raises(ValueError, match="temperature"):
        mixture_probs({"a": 1.0}, 0)


def test_mixture_stream_follows_weights(tmp_path):
    a = make_corpus(tmp_path, "a", [good("a", f"a{i}", 0.2, i) for i in range(2)])
    b = make_corpus(tmp_path, "b", [good("b", f"b{i}", 0.2, i) for i in range(2)])
    mix = MixtureStream({"a": _urls(a), "b": _urls(b)}, {"a": 0.8, "b": 0.2}, [0, 0], RejectCounter())
    counts = Counter(mix.next()["__corpus__"] for _ in range(2000))
    # binomial sd = sqrt(2000 * .8 * .2) ~ 18: 4 sd tolerance
    assert abs(counts["a"] - 1600) < 72


def test_padded_mode_budget_and_over_budget_skip(tokenizer, tmp_path):
    members = []
    for i, sec in enumerate([0.4, 0.8, 1.2, 1.6, 2.0, 2.4]):
        members += good("c", f"u{i}", sec, i)
    folder = make_corpus(tmp_path, "c", [members])
    stream = _stream(tokenizer, {"c": _urls(folder)}, mode="padded", packing_length=300, buffer_size=6)
    for batch in islice(iter(stream), 6):
        b, length = batch["input_ids"].shape
        assert b * length <= 300
        assert "position_ids" not in batch
    packed = _stream(tokenizer, {"c": _urls(folder)}, mode="packed", packing_length=300, buffer_size=6)
    for batch in islice(iter(packed), 6):
        assert batch["input_ids"].shape[1] <= 300
        assert batch["input_ids"].shape[0] == 1


# ---------------------------------------------------------------------------------------- exact resume


def _corpora(tmp_path: Path) -> dict[str, list[str]]:
    out = {}
    for c, n_shards in (("a", 3), ("b", 2)):
        shards = []
        for s in range(n_shards):
            members = []
            for i in range(5):
                members += good(c, f"{c}{s}_{i}", 0.3 + 0.2 * ((i * 7 + s) % 5), 10 * s + i)
            shards.append(members)
        out[c] = _urls(make_corpus(tmp_path, c, shards))
    return out


@pytest.mark.parametrize("stop_after", [1, 3, 4, 7])
def test_stream_state_resumes_exactly(tokenizer, tmp_path, stop_after):
    corpora = _corpora(tmp_path)
    probs = {"a": 0.6, "b": 0.4}
    reference = list(islice(iter(_stream(tokenizer, corpora, probs)), stop_after + 6))
    first = list(islice(iter(_stream(tokenizer, corpora, probs)), stop_after))
    state = first[-1]["data_state"]
    resumed = list(islice(iter(_stream(tokenizer, corpora, probs, resume={0: state})), 6))
    assert [b["keys"] for b in first + resumed] == [b["keys"] for b in reference]
    assert [b["data_state"]["rejects"] for b in resumed] == [
        b["data_state"]["rejects"] for b in reference[stop_after:]
    ]
    for got, want in zip(resumed, reference[stop_after:]):
        assert np.array_equal(got["audio_windows"].numpy(), want["audio_windows"].numpy())


class _KeyRecorder(L.Callback):
    def __init__(self):
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(list(batch["keys"]))


def _fit(model, corpora: dict[str, list[str]], out: Path, max_steps: int, ckpt_path=None, workers: int = 2):
    dm = AeroDataModule(
        train={
            name: {"dir": str(Path(urls[0]).parent), "weight": w}
            for (name, urls), w in zip(corpora.items(), (3, 2))
        },
        packing={"mode": "packed", "packing_length": 300, "buffer_size": 8},
        num_workers=workers,
        seed=5,
    )
    dm.bind_model(model.tokenizer, model.audio_token_counter())
    recorder = _KeyRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_top_k=-1)],
    )
    trainer.fit(AeroLitModule(model, lr=1e-3, warmup_steps=1), datamodule=dm, ckpt_path=ckpt_path)
    return recorder.keys


def test_lightning_resume_sees_the_same_samples_as_an_uninterrupted_run(make_model, tmp_path):
    """Train 3 steps, stop, resume to 8: the keys of steps 4-8 equal those of one 8-step run (2 workers)."""
    corpora = _corpora(tmp_path / "data")
    uninterrupted = _fit(make_model(), corpora, tmp_path / "full", max_steps=8)
    first = _fit(make_model(), corpora, tmp_path / "part", max_steps=3)
    ckpt = tmp_path / "part" / "epoch=0-step=3.ckpt"
    assert ckpt.is_file()
    resumed = _fit(make_model(), corpora, tmp_path / "resumed", max_steps=8, ckpt_path=str(ckpt))
    assert len(uninterrupted) == 8 and len(first) == 3 and len(resumed) == 5
    assert first + resumed == uninterrupted


def test_shards_split_by_rank_and_worker(tokenizer, tmp_path, monkeypatch):
    """With enough shards every (rank, worker) reads its own; with too few they share all and differ by seed."""
    corpora = _corpora(tmp_path)  # a: 3 shards, b: 2 shards
    stream = _stream(tokenizer, corpora)
    assert stream._split(0, 2) == {"a": corpora["a"][0::2], "b": corpora["b"][0:1]}
    assert stream._split(1, 2) == {"a": corpora["a"][1::2], "b": corpora["b"][1:2]}
    assert stream._split(2, 3) == {"a": corpora["a"][2:3], "b": corpora["b"]}  # b: 2 shards < 3 readers

    def keys_of_rank(rank: int) -> set[str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        return {k for b in islice(iter(_stream(tokenizer, corpora)), 6) for k in b["keys"]}

    rank0, rank1 = keys_of_rank(0), keys_of_rank(1)
    shard_of = {k: k.split("_")[0] for k in rank0 | rank1}  # "a0_3" -> "a0": corpus + shard index
    assert {shard_of[k] for k in rank0} <= {"a0", "a2", "b0"}
    assert {shard_of[k] for k in rank1} <= {"a1", "b1"}
