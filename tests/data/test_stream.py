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
from aero_lightning.data.stream import (
    CorpusStream,
    MixtureStream,
    TrainStream,
    mixture_probs,
    plan_shards,
    shard_weights,
)
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


def cut_inside(path: Path, member: str) -> None:
    """Truncate a tar shard half-way through the data of ``member``."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


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
    cut_inside(path, "c.flac")
    rejects = RejectCounter()
    keys = [s["__key__"] for s in iter_tar(str(path), rejects)]
    assert keys == ["a", "b"]  # the whole samples before the damage are kept, the cut one is not
    assert rejects == {"truncated_tar": 1}
    assert [s["__key__"] for s in iter_tar(str(tmp_path / "missing.tar"), rejects)] == []
    assert rejects == {"truncated_tar": 1, "unreadable_shard": 1}


def test_truncated_shard_in_training_stream(tokenizer, tmp_path):
    folder = make_corpus(
        tmp_path, "c", [good("c", "a", 1.0, 0) + good("c", "b", 1.0, 1) + good("c", "z", 1.0, 2)]
    )
    tar = next(folder.glob("*.tar"))
    cut_inside(tar, "z.flac")
    batch = next(iter(_stream(tokenizer, {"c": _urls(folder)}, buffer_size=5)))  # more than one pass holds
    assert batch["data_state"]["rejects"]["truncated_tar"] >= 2  # the shard was drawn again after it broke
    assert set(batch["keys"]) <= {"a", "b"} and batch["keys"]


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
        assert np.array_equal(got["audio_pcm"].numpy(), want["audio_pcm"].numpy())


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


def _read_rates(num_shards: int, num_readers: int, plan) -> np.ndarray:
    """Expected draws of every shard per draw of each reader, all readers drawing at the same rate."""
    rates = np.zeros(num_shards)
    urls = [str(k) for k in range(num_shards)]
    for reader in range(num_readers):
        shards, weights = plan(urls, reader, num_readers)
        w = np.ones(len(shards)) if weights is None else np.asarray(weights, dtype=float)
        for url, p in zip(shards, w / w.sum()):
            rates[int(url)] += p
    return rates


@pytest.mark.parametrize("num_shards", [200, 130, 100, 7])
def test_every_shard_is_read_at_the_same_expected_rate(num_shards):
    """128 readers (16 GPUs x 8 workers): every shard's expected read rate is within 5 % of the corpus mean. The
    strided split this replaces (``urls[r::R]``, all shards when fewer than readers) read 56 of 200 shards (and
    126 of 130) at twice the rate of the others."""
    rates = _read_rates(num_shards, 128, plan_shards)
    mean = 128 / num_shards  # every reader draws once
    assert rates.sum() == pytest.approx(128)
    assert np.abs(rates / mean - 1).max() <= 0.05
    assert np.allclose(rates, mean, rtol=1e-12)  # exact up to float rounding: the arcs tile the circle


def test_shard_weights_are_the_arc_overlaps():
    # 3 shards, 2 readers (circle scaled by 2): reader 0 [0, 3) covers shard 0 [0, 2) and half of shard 1 [2, 4)
    assert shard_weights(3, 0, 2) == {0: 2, 1: 1}
    assert shard_weights(3, 1, 2) == {1: 1, 2: 2}
    # 2 shards, 3 readers (scaled by 3): reader 1 [2, 4) straddles both shards equally
    assert [shard_weights(2, r, 3) for r in range(3)] == [{0: 2}, {0: 1, 1: 1}, {1: 2}]
    assert shard_weights(5, 0, 1) == {k: 1 for k in range(5)}
    for n, readers in ((200, 128), (130, 128), (7, 128), (128, 128), (1, 3)):
        weights = [shard_weights(n, r, readers) for r in range(readers)]
        assert all(sum(w.values()) == n for w in weights)  # every arc has length n (scaled)
        per_shard = Counter()
        for w in weights:
            per_shard.update(w)
        assert per_shard == {k: readers for k in range(n)}  # every shard is covered exactly once
    with pytest.raises(ValueError, match="out of range"):
        shard_weights(3, 2, 2)
    with pytest.raises(ValueError, match=">= 1 shard"):
        shard_weights(0, 0, 2)


def test_one_reader_draws_every_shard_uniformly_as_before():
    """1 rank x 1 worker: all shards, no weights, and the draws are ``rng.integers(len(urls))`` unchanged."""
    urls = [f"s{k}" for k in range(6)]
    assert plan_shards(urls, 0, 1) == (urls, None)
    stream = CorpusStream("c", urls, [3, 0, 1], RejectCounter())
    rng = np.random.default_rng(np.random.SeedSequence([3, 0, 1]))
    assert [stream.draw() for _ in range(50)] == [int(rng.integers(6)) for _ in range(50)]
    # readers whose arc covers whole shards only draw uniformly too: 8 shards over 4 readers
    assert plan_shards([f"s{k}" for k in range(8)], 3, 4) == (["s6", "s7"], None)


def test_weighted_draws_follow_the_arc_overlaps():
    urls, weights = plan_shards([f"s{k}" for k in range(3)], 0, 2)
    assert (urls, weights) == (["s0", "s1"], [2, 1])
    stream = CorpusStream("c", urls, [0, 5, 1], RejectCounter(), weights)
    counts = Counter(stream.draw() for _ in range(30000))
    # binomial sd = sqrt(30000 * 2/3 * 1/3) ~ 82: 4 sd tolerance
    assert abs(counts[0] - 20000) < 330 and counts[0] + counts[1] == 30000
    with pytest.raises(ValueError, match="one weight"):
        CorpusStream("c", urls, [0], RejectCounter(), [1])


def test_shards_split_by_rank_and_worker(tokenizer, tmp_path, monkeypatch):
    """Each rank reads its arc of every corpus: a (3 shards) is split 2:1 / 1:2 over 2 readers, b (2 shards) 1 / 1."""
    corpora = _corpora(tmp_path)  # a: 3 shards, b: 2 shards
    stream = _stream(tokenizer, corpora)
    assert stream._plan(0, 2) == {"a": (corpora["a"][0:2], [2, 1]), "b": (corpora["b"][0:1], None)}
    assert stream._plan(1, 2) == {"a": (corpora["a"][1:3], [1, 2]), "b": (corpora["b"][1:2], None)}
    assert stream._plan(1, 3)["b"] == (corpora["b"], None)  # b: 2 shards < 3 readers, reader 1 straddles both

    def keys_of_rank(rank: int) -> set[str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        return {k for b in islice(iter(_stream(tokenizer, corpora)), 6) for k in b["keys"]}

    rank0, rank1 = keys_of_rank(0), keys_of_rank(1)
    shard_of = {k: k.split("_")[0] for k in rank0 | rank1}  # "a0_3" -> "a0": corpus + shard index
    assert {shard_of[k] for k in rank0} <= {"a0", "a1", "b0"}
    assert {shard_of[k] for k in rank1} <= {"a1", "a2", "b1"}
