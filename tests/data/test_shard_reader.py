"""The one shard reader: validation / test / eval passes, damaged shards, rank x worker split, reject reasons."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from torch.utils.data import DataLoader

import aero_lightning
from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.datamodule import AeroDataModule, make_dataset
from aero_lightning.data.rejects import REJECT_REASONS, RejectCounter, check_reason
from aero_lightning.data.shard_reader import (
    ShardPass,
    balanced_pass,
    iter_samples,
    read_sample,
    resolve_split,
    shard_sample_counts,
    split_urls,
)
from aero_lightning.data.shards import asr_sample_json, build_manifest, write_manifest
from aero_lightning.data.stream import identity
from aero_lightning.eval.benchmarks import get_benchmark
from aero_lightning.eval.sources import iter_items

SR = 16000
COUNTER = AudioTokenCounter(encoder_downsample=2, projector_downsample=4)


def _wave(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(round(seconds * SR))).astype(np.float32)


def _encode(wave: np.ndarray, fmt: str) -> bytes:
    """16-bit PCM bytes; written from int16 so FLAC and WAV hold identical samples (their float writers round
    differently)."""
    buf = io.BytesIO()
    sf.write(buf, np.round(wave * 32767).astype(np.int16), SR, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_split(folder: Path, shards: list[list[str]], fmt: str = "flac", seconds: float = 0.5) -> list[str]:
    """A prepared split: shard ``i`` holds the samples named ``shards[i]``; returns the shard urls."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, durations = [], []
    for i, keys in enumerate(shards):
        members = []
        for key in keys:
            seed = int.from_bytes(key.encode(), "little") % 2**32
            record = asr_sample_json(corpus="wavflac", text=f"words of {key}", duration_s=seconds, source="t")
            members += [
                (f"{key}.json", json.dumps(record).encode()),
                (f"{key}.{fmt}", _encode(_wave(seconds, seed), fmt)),
            ]
        name = f"s-{i:06d}.tar"
        _write_tar(folder / name, members)
        entries.append({"name": name, "num_samples": len(keys), "duration_s": seconds * len(keys)})
        durations += [seconds] * len(keys)
    write_manifest(
        folder, build_manifest(corpus="wavflac", split="test", shards=entries, durations_s=durations)
    )
    return resolve_split(folder)


def _cut_inside(path: Path, member: str) -> None:
    """Truncate a tar shard in the middle of ``member``'s data."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
        cut = info.offset_data + info.size // 2
    path.write_bytes(path.read_bytes()[:cut])


SHARDS = [["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1", "c2"]]
ALL_KEYS = [k for keys in SHARDS for k in keys]


# ------------------------------------------------------------------------------------------ formats


def test_wav_and_flac_shards_give_the_same_samples(tmp_path):
    flac = list(ShardPass(_write_split(tmp_path / "flac", SHARDS, "flac")))
    wav = list(ShardPass(_write_split(tmp_path / "wav", SHARDS, "wav")))
    assert [s["key"] for s in flac] == [s["key"] for s in wav] == ALL_KEYS
    for f, w in zip(flac, wav):
        assert set(f) == set(w) == {"key", "waveform", "waveforms", "messages", "duration_s", "corpus", "task"}
        assert f["waveform"].dtype == w["waveform"].dtype == np.float32
        assert f["waveform"].shape == w["waveform"].shape == (8000,)
        assert np.array_equal(f["waveform"], w["waveform"])  # both lossless 16-bit PCM of the same wave
        assert (
            f["messages"] == w["messages"]
            and f["messages"][-1]["content"][0]["text"] == f"words of {f['key']}"
        )
        assert f["duration_s"] == w["duration_s"] == 0.5
        assert f["corpus"] == w["corpus"] == "wavflac"


def test_eval_source_reads_wav_shards_like_flac_shards(tmp_path):
    _write_split(tmp_path / "flac", SHARDS, "flac")
    _write_split(tmp_path / "wav", SHARDS, "wav")
    spec = get_benchmark("demo")
    counts = {fmt: Counter() for fmt in ("flac", "wav")}
    items = {fmt: list(iter_items(spec, source=tmp_path / fmt, rejects=counts[fmt])) for fmt in counts}
    assert [i.key for i in items["flac"]] == [i.key for i in items["wav"]] == ALL_KEYS
    assert [i.reference for i in items["wav"]] == [f"words of {k}" for k in ALL_KEYS]
    assert all(np.array_equal(f.waveform, w.waveform) for f, w in zip(items["flac"], items["wav"]))
    assert counts == {"flac": Counter(), "wav": Counter()}


def test_validation_loader_batches_wav_shards(tokenizer, tmp_path):
    _write_split(tmp_path / "train", [["t0"]], "flac")
    _write_split(tmp_path / "val", SHARDS, "wav")
    dm = AeroDataModule(
        train={"c": str(tmp_path / "train")}, val_dirs={"v": str(tmp_path / "val")}, eval_batch_size=3
    )
    dm.bind_model(tokenizer, COUNTER)
    (loader,) = dm.val_dataloader()
    batches = list(loader)
    assert [b["keys"] for b in batches] == [["a0", "a1", "a2"], ["b0", "b1", "c0"], ["c1", "c2"]]
    assert [b["audio_samples"].tolist() for b in batches] == [[8000] * 3, [8000] * 3, [8000] * 2]
    assert batches[0]["corpora"] == ["wavflac"] * 3


# ------------------------------------------------------------------------------------- damaged shards


def test_truncated_shard_is_counted_and_keeps_the_samples_before_the_damage(tmp_path):
    urls = _write_split(tmp_path / "val", SHARDS)
    _cut_inside(Path(urls[0]), "a1.flac")
    dataset = make_dataset(urls, expected_samples=shard_sample_counts(tmp_path / "val"))
    assert [s["key"] for s in dataset] == ["a0", "b0", "b1", "c0", "c1", "c2"]
    assert dataset.rejects == {"truncated_tar": 1, "missing_samples": 2}  # a1 (cut) and a2 (after the cut)
    assert [s["key"] for s in dataset] == ["a0", "b0", "b1", "c0", "c1", "c2"]  # a second pass: same samples
    assert dataset.rejects == {"truncated_tar": 2, "missing_samples": 4}  # counts accumulate over passes


def test_a_cut_in_the_first_member_of_a_sample_keeps_the_whole_sample_before_it(tmp_path):
    """The cut falls in a1's first member (its JSON): a0 was read whole and is kept; only a1 and a2 are lost."""
    urls = _write_split(tmp_path / "val", SHARDS)
    _cut_inside(Path(urls[0]), "a1.json")
    dataset = make_dataset(urls, expected_samples=shard_sample_counts(tmp_path / "val"))
    assert [s["key"] for s in dataset] == ["a0", "b0", "b1", "c0", "c1", "c2"]
    assert dataset.rejects == {"truncated_tar": 1, "missing_samples": 2}


def test_truncated_shard_in_an_eval_source_is_counted(tmp_path):
    urls = _write_split(tmp_path / "bench", SHARDS)
    _cut_inside(Path(urls[2]), "c2.flac")
    rejects: Counter = Counter()
    items = list(iter_items(get_benchmark("demo"), source=tmp_path / "bench", rejects=rejects))
    assert [i.key for i in items] == ["a0", "a1", "a2", "b0", "b1", "c0", "c1"]
    assert rejects == Counter({"truncated_tar": 1, "missing_samples": 1})


def test_unreadable_shard_loses_all_its_samples(tmp_path):
    urls = _write_split(tmp_path / "val", SHARDS)
    rejects = RejectCounter()
    expected = shard_sample_counts(tmp_path / "val")
    assert expected == dict(zip(urls, [3, 2, 3]))
    gone = str(tmp_path / "gone.tar")
    samples = list(iter_samples([gone, urls[1]], rejects, expected_samples={**expected, gone: 4}))
    assert [s["key"] for s in samples] == ["b0", "b1"]
    assert rejects == {"unreadable_shard": 1, "missing_samples": 4}
    # without manifest counts only the shard itself is counted
    rejects.clear()
    assert [s["key"] for s in iter_samples([urls[0]], rejects)] == ["a0", "a1", "a2"] and not rejects


def test_bad_samples_inside_a_pass_are_counted_by_reason(tmp_path):
    good = asr_sample_json(corpus="c", text="fine", duration_s=0.5, source="t")
    members = [
        ("ok.json", json.dumps(good).encode()),
        ("ok.wav", _encode(_wave(0.5, 0), "wav")),
        ("nojson.flac", _encode(_wave(0.5, 1), "flac")),
        ("corrupt.json", json.dumps(good).encode()),
        ("corrupt.ogg", b"OggS" + b"\x00" * 40),
        ("long.json", json.dumps(asr_sample_json(corpus="c", text="x", duration_s=3.0, source="t")).encode()),
        ("long.flac", _encode(_wave(3.0, 2), "flac")),
    ]
    _write_tar(tmp_path / "x.tar", members)
    rejects = RejectCounter()
    samples = list(iter_samples([str(tmp_path / "x.tar")], rejects, max_duration_s=2.0))
    assert [s["key"] for s in samples] == ["ok"]
    assert rejects == {"missing_member": 1, "corrupt_audio": 1, "too_long": 1}


def test_skipped_sample_warnings_name_the_shard_and_the_key(tmp_path, caplog):
    good = asr_sample_json(corpus="c", text="fine", duration_s=0.5, source="t")
    members = [
        ("corrupt.json", json.dumps(good).encode()),
        ("corrupt.flac", b"fLaC" + b"\x00" * 40),
        ("nojson.flac", _encode(_wave(0.5, 1), "flac")),
    ]
    _write_tar(tmp_path / "c-train-000007.tar", members)
    with caplog.at_level(logging.WARNING, logger="aero_lightning.data.rejects"):
        assert not list(iter_samples([str(tmp_path / "c-train-000007.tar")], RejectCounter()))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("skipping c-train-000007.tar:corrupt: corrupt_audio LibsndfileError: ")
    assert messages[1].startswith("skipping c-train-000007.tar:nojson: missing_member ")
    assert not [m for m in messages if " at 0x" in m]  # no <_io.BytesIO object at 0x...>


# ---------------------------------------------------------------------------------- rank x worker split


def test_split_urls_matches_webdataset_and_covers_every_shard_once(monkeypatch):
    urls = [f"shard-{i:02d}.tar" for i in range(13)]
    seen: list[str] = []
    for world in (1, 2, 3):
        for workers in (1, 2, 4):
            seen.clear()
            for rank in range(world):
                for worker in range(workers):
                    mine = split_urls(urls, rank, world, worker, workers)
                    monkeypatch.setenv("RANK", str(rank))
                    monkeypatch.setenv("WORLD_SIZE", str(world))
                    monkeypatch.setenv("WORKER", str(worker))
                    monkeypatch.setenv("NUM_WORKERS", str(workers))
                    reference = list(wds.split_by_worker(wds.split_by_node(iter(urls))))
                    assert mine == reference == urls[rank::world][worker::workers]
                    seen += mine
            assert sorted(seen) == urls  # disjoint and complete
    with pytest.raises(ValueError, match="rank 2"):
        split_urls(urls, 2, 2, 0, 1)
    with pytest.raises(ValueError, match="worker 3"):
        split_urls(urls, 0, 1, 3, 3)


def test_shard_pass_split_by_rank_and_worker_is_disjoint_and_complete(tmp_path, monkeypatch):
    shards = [[f"k{i}-{j}" for j in range(i % 3 + 1)] for i in range(7)]
    urls = _write_split(tmp_path / "val", shards)
    keys_of = dict(zip(urls, shards))
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = DataLoader(ShardPass(urls), batch_size=None, num_workers=2, collate_fn=identity)
        keys = [s["key"] for s in loader]
        assert sorted(keys) == sorted(k for u in urls[rank::2] for k in keys_of[u])  # no sample read twice
        for worker in range(2):  # each worker reads its shards in order
            mine = [k for u in split_urls(urls, rank, 2, worker, 2) for k in keys_of[u]]
            assert [k for k in keys if k in mine] == mine
        per_rank.append(keys)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(k for ks in shards for k in ks)
    assert split_urls(urls, 1, 2, 1, 2) == [urls[3]]


# --------------------------------------------------------------------------------------------- rejects


def test_unknown_reject_reason_raises_and_counts_nothing():
    rejects = RejectCounter()
    with pytest.raises(ValueError, match="unknown reject reason 'no_such_reason'"):
        rejects.reject("no_such_reason", "k")
    assert rejects == {}
    with pytest.raises(ValueError, match="unknown reject reason"):
        check_reason("corrupt")
    assert check_reason("corrupt_audio") == "corrupt_audio"
    with pytest.raises(ValueError, match="count must be >= 1"):
        rejects.reject("too_long", "k", count=0)
    assert rejects == {}


def test_reject_logs_the_first_ten_then_powers_of_ten(caplog):
    rejects = RejectCounter()
    with caplog.at_level(logging.WARNING, logger="aero_lightning.data.rejects"):
        for i in range(1000):
            rejects.reject("too_long", f"k{i}", "3.0 s")
        rejects.reject("missing_samples", "shard.tar", "lost", count=250)  # 1 -> 250 passes 1..10 and 100
        rejects.reject("empty_text", "q", log=False)
    assert rejects == {"too_long": 1000, "missing_samples": 250, "empty_text": 1}
    messages = [r.getMessage() for r in caplog.records]
    logged = [int(m.rsplit(": ", 1)[1].rstrip(")")) for m in messages if "too_long so far" in m]
    assert logged == [*range(1, 11), 100, 1000]
    assert [m for m in messages if "missing_samples" in m] == [
        "skipping shard.tar: missing_samples lost (missing_samples so far: 250)"
    ]
    assert not [m for m in messages if "empty_text" in m]


_REASON_PATTERNS = (
    r"\.reject\(\s*\"(\w+)\"",  # RejectCounter.reject("reason", ...)
    r"\breason=\"(\w+)\"",  # prepare's _Outcome / synth's _Rendered
    r"\"reason\": \"(\w+)\"",  # longform's rejected list
    r"\breason = \"(\w+)\" if",  # reason = "a" if ... else "b"
    r"\breason = \"\w+\" if [^\n]* else \"(\w+)\"",
    r"\(\"(\w+)\", f\"\{(?:where|source)\}",  # readers.py: (reason, detail) tuples of table rows
)


def test_every_reason_in_the_code_is_in_the_table_and_every_table_entry_is_used():
    root = Path(aero_lightning.__file__).parent
    sources = {p: p.read_text(encoding="utf-8") for p in root.rglob("*.py") if p.name != "rejects.py"}
    used = {m for text in sources.values() for pattern in _REASON_PATTERNS for m in re.findall(pattern, text)}
    assert len(used) >= 25, sorted(used)  # the patterns do find the reasons
    assert used <= set(REJECT_REASONS), sorted(used - set(REJECT_REASONS))
    everything = "\n".join(sources.values())
    unused = [r for r in REJECT_REASONS if f'"{r}"' not in everything]
    assert unused == []
    assert all(isinstance(v, str) and v and "\n" not in v for v in REJECT_REASONS.values())


def test_read_sample_prefers_flac_and_takes_the_corpus_from_the_json():
    wave = _wave(0.25, 3)
    record = asr_sample_json(corpus="json_corpus", text="hi", duration_s=0.25, source="t")
    raw = {
        "__key__": "k",
        "json": json.dumps(record).encode(),
        "wav": b"not audio",
        "flac": _encode(wave, "flac"),
    }
    rejects = RejectCounter()
    sample = read_sample(raw, rejects)
    assert sample is not None and not rejects
    assert sample["corpus"] == "json_corpus" and sample["duration_s"] == 0.25
    assert np.array_equal(sample["waveform"], sf.read(io.BytesIO(raw["flac"]), dtype="float32")[0])


# ---------------------------------------------------------------------------------------- balanced pass


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_balanced_pass_gives_every_rank_the_same_count_and_scores_each_sample_once(tmp_path, world):
    """Sharded strategies need equal batch counts on every rank: 3 shards of 3, 2, 3 samples over 2..5 ranks."""
    urls = _write_split(tmp_path / "split", SHARDS)
    counts = shard_sample_counts(tmp_path / "split")
    passes = [list(balanced_pass(urls, r, world, counts, RejectCounter())) for r in range(world)]
    target = max(sum(len(SHARDS[i]) for i in range(r, len(SHARDS), world)) for r in range(world))
    assert [len(p) for p in passes] == [target] * world
    originals = [s["key"] for p in passes for s in p if not s.get("duplicate")]
    assert sorted(originals) == sorted(ALL_KEYS)  # every sample once, whatever the padding
    for p in passes:  # repeats come after the rank's own samples
        flags = [bool(s.get("duplicate")) for s in p]
        assert flags == sorted(flags)


def test_balanced_pass_makes_up_for_a_damaged_shard(tmp_path):
    urls = _write_split(tmp_path / "split", SHARDS)
    counts = shard_sample_counts(tmp_path / "split")
    _cut_inside(Path(urls[0]), "a1.flac")  # rank 0 of 2 holds shards 0 and 2: loses a1 and a2
    rejects = RejectCounter()
    rank0 = list(balanced_pass(urls, 0, 2, counts, rejects))
    assert len(rank0) == 6 and [s["key"] for s in rank0 if not s.get("duplicate")] == ["a0", "c0", "c1", "c2"]
    assert rejects["truncated_tar"] == 1 and rejects["missing_samples"] == 2


def test_validation_batches_are_equal_across_ranks_and_repeats_carry_no_loss(
    tokenizer, tmp_path, monkeypatch
):
    """With 2 ranks the eval loaders are balanced: the same batch count on each rank, repeats with no target."""
    _write_split(tmp_path / "split", [["a0", "a1", "a2", "a3", "a4"], ["b0"]])
    batches = {}
    for rank in (0, 1):
        monkeypatch.setattr("aero_lightning.data.datamodule.rank_and_world", lambda r=rank: (r, 2))
        monkeypatch.setattr("aero_lightning.data.shard_reader.dist_rank_world", lambda r=rank: (r, 2))
        dm = AeroDataModule(train={}, val_dirs={"v": str(tmp_path / "split")}, eval_batch_size=2)
        dm.bind_model(tokenizer, COUNTER)
        batches[rank] = list(dm.val_dataloader()[0])
    assert len(batches[0]) == len(batches[1]) == 3
    assert [b["duplicates"] for b in batches[1]] == [[False, True], [True, True], [True]]
    for batch in batches[1]:
        for labels, repeat in zip(batch["labels"], batch["duplicates"]):
            assert bool((labels != -100).any()) != repeat
