"""Tests of the offline demo corpus builder (aero_lightning.data.synth) and the shard writer."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from aero_lightning.data import shards, synth
from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.data.shards import (
    ShardWriter,
    decode_audio,
    encode_flac,
    read_manifest,
    shard_urls,
)
from aero_lightning.data.synth import EspeakNotFoundError, build_demo_corpus

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
needs_wordnet = pytest.mark.skipif(
    not (synth.WORDNET_DIR / "data.noun").is_file(), reason="wordnet-base not installed"
)

SENTENCES = [
    "The cat sat on the warm mat",
    "She opened the window to let in some air",
    "We walked along the river until sunset",
    "He could not find his keys anywhere",
    "The children played quietly in the garden",
    "Please close the door behind you",
    "The train was late again this morning",
    "They painted the fence a bright shade of blue",
    "I would like a cup of tea, please",
    "The old bridge was closed for repairs",
    "Is it going to rain tomorrow?",
    "The committee approved the new budget",
    "Her voice carried across the crowded hall",
    "A small boat drifted toward the shore",
    "The recipe calls for two eggs and some flour",
    "He answered every question without hesitation",
    "The library opens early on weekdays",
    "Snow covered the hills overnight",
    "They argued about the best route home",
    "The music grew louder as the night went on",
    "Don't forget to water the plants!",
    "The museum's new exhibit attracted large crowds",
]
SIZES = {"num_train": 12, "num_val": 3, "num_test": 3}
SPLIT_SIZES = {"train": 12, "validation": 3, "test": 3}


def _build(out: Path, **kwargs):
    params = {
        **SIZES,
        "seed": 0,
        "shard_size": 5,
        "num_workers": 2,
        "sentences": SENTENCES,
        "progress": False,
    }
    params.update(kwargs)
    return build_demo_corpus(out, **params)


def _tar_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def _samples(folder: Path) -> list[tuple[str, dict, bytes]]:
    """(key, json, flac bytes) of every sample in a split, in shard order, via plain tarfile."""
    out = []
    for url in shard_urls(folder):
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".", 1)[0] for name in members}):
            out.append((key, json.loads(members[f"{key}.json"]), members[f"{key}.flac"]))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_a")
    return root, _build(root)


# ------------------------------------------------------------------------------------------ corpus


@needs_espeak
def test_determinism_across_runs_and_workers(corpus, tmp_path):
    root_a, manifests_a = corpus
    manifests_b = _build(tmp_path, num_workers=1)
    assert manifests_a == manifests_b
    bytes_a, bytes_b = _tar_bytes(root_a), _tar_bytes(tmp_path)
    assert list(bytes_a) == list(bytes_b) and len(bytes_a) == 3 + 1 + 1  # 12/5 -> 3 train shards
    assert bytes_a == bytes_b
    for split in SPLIT_SIZES:
        assert (root_a / split / "manifest.json").read_bytes() == (
            tmp_path / split / "manifest.json"
        ).read_bytes()


@needs_espeak
def test_different_seed_gives_different_split(corpus, tmp_path):
    _, manifests_a = corpus
    _build(tmp_path, seed=1)
    texts_a = {s[1]["text"] for s in _samples(corpus[0] / "test")}
    texts_b = {s[1]["text"] for s in _samples(tmp_path / "test")}
    assert texts_a != texts_b


@needs_espeak
def test_splits_disjoint_and_counts(corpus):
    root, manifests = corpus
    texts = {}
    for split, n in SPLIT_SIZES.items():
        samples = _samples(root / split)
        assert manifests[split]["num_samples"] == n == len(samples)
        assert [k for k, _, _ in samples] == [f"demo-{split}-{i:06d}" for i in range(n)]
        texts[split] = {rec["text"] for _, rec, _ in samples}
        assert len(texts[split]) == n
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert set().union(*texts.values()) <= set(SENTENCES)


@needs_espeak
def test_manifest_consistent_with_tars(corpus):
    root, manifests = corpus
    for split, manifest in manifests.items():
        folder = root / split
        assert read_manifest(folder) == manifest
        assert manifest["corpus"] == "demo_espeak" and manifest["split"] == split
        assert manifest["sample_rate"] == 16000
        total_s = 0.0
        for shard in manifest["shards"]:
            with tarfile.open(folder / shard["name"]) as tar:
                members = tar.getmembers()
            assert len(members) == 2 * shard["num_samples"]
            assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 and m.uname == "" for m in members)
            assert shard["num_samples"] <= 5
        for _key, rec, flac in _samples(folder):
            wave, sr = decode_audio(flac)
            info = sf.info(io.BytesIO(flac))
            assert (sr, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
            assert wave.dtype == np.float32 and 0 < np.abs(wave).max() <= 1.0
            assert abs(rec["duration_s"] - len(wave) / 16000) < 1e-3
            total_s += rec["duration_s"]
            assert rec["task"] == "asr" and rec["language"] == "en" and rec["corpus"] == "demo_espeak"
            user, assistant = rec["messages"]
            assert user == {
                "role": "user",
                "content": [{"type": "audio"}, {"type": "text", "text": DEFAULT_ASR_PROMPT}],
            }
            assert assistant["role"] == "assistant" and assistant["content"][0]["text"] == rec["text"]
            assert (
                rec["source"]
                == f"espeak-ng:{rec['voice']}+{rec['variant']}:s{rec['speed_wpm']}:p{rec['pitch']}"
            )
            assert re.fullmatch(r"en(-\S+)?", rec["voice"]) and 140 <= rec["speed_wpm"] <= 200
            assert 35 <= rec["pitch"] <= 65
        assert manifest["duration_s"] == pytest.approx(total_s, abs=1e-4)
        assert manifest["hours"] == pytest.approx(total_s / 3600, abs=1e-5)
        assert sum(s["duration_s"] for s in manifest["shards"]) == pytest.approx(total_s, abs=1e-4)
        hist = manifest["duration_histogram"]
        assert len(hist["counts"]) == len(hist["edges_s"]) - 1 and hist["edges_s"][-1] is None
        assert sum(hist["counts"]) == manifest["num_samples"]
        assert manifest["rejected"] == [] and manifest["rejected_counts"] == {}


@needs_espeak
def test_plain_webdataset_reads_shards(corpus):
    import webdataset as wds

    root, manifests = corpus
    urls = shard_urls(root / "train")
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == manifests["train"]["num_samples"]
    for sample in samples:
        assert {"__key__", "flac", "json"} <= set(sample)
        rec = json.loads(sample["json"])
        assert rec["duration_s"] > 0 and sample["__key__"].startswith("demo-train-")


@needs_espeak
def test_no_tmp_files_and_rerun_skips(corpus):
    root, manifests = corpus
    assert not list(root.rglob("*.tmp"))
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = _build(root)
    assert again == manifests
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


@needs_espeak
def test_changing_train_size_keeps_eval_splits(tmp_path):
    _build(tmp_path)
    test_mtime = (tmp_path / "test" / "manifest.json").stat().st_mtime_ns
    val_bytes = _tar_bytes(tmp_path / "validation")
    manifests = _build(tmp_path, num_train=4)
    assert (tmp_path / "test" / "manifest.json").stat().st_mtime_ns == test_mtime
    assert _tar_bytes(tmp_path / "validation") == val_bytes
    assert manifests["train"]["num_samples"] == 4
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["demo_espeak-train-000000.tar"]


@needs_espeak
def test_overwrite_rebuilds_identically(corpus, tmp_path):
    _build(tmp_path, num_train=2)
    manifest_path = tmp_path / "test" / "manifest.json"
    mtime = manifest_path.stat().st_mtime_ns
    before = _tar_bytes(tmp_path)
    _build(tmp_path, num_train=2, overwrite=True)
    assert manifest_path.stat().st_mtime_ns != mtime
    assert _tar_bytes(tmp_path) == before


@needs_espeak
def test_failed_synthesis_is_rejected_not_fatal(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    victim_key, victim, _ = _samples(root / "test")[1]
    real = synth.synthesize

    def flaky(text, spec, *args, **kwargs):
        if text == victim["text"]:
            raise RuntimeError("boom")
        return real(text, spec, *args, **kwargs)

    monkeypatch.setattr(synth, "synthesize", flaky)
    manifests = _build(tmp_path)
    test = manifests["test"]
    assert test["num_samples"] == SPLIT_SIZES["test"] - 1
    assert test["rejected"] == [
        {"key": victim_key, "reason": "synthesis_failed", "detail": "RuntimeError: boom"}
    ]
    assert test["rejected_counts"] == {"synthesis_failed": 1}
    assert victim_key not in {k for k, _, _ in _samples(tmp_path / "test")}
    assert manifests["train"]["num_samples"] == SPLIT_SIZES["train"]


@needs_espeak
def test_empty_audio_is_rejected(tmp_path, monkeypatch):
    real = synth.synthesize

    def silent(text, spec, *args, **kwargs):  # the voice probe in list_english_voices keeps working
        return np.zeros(0, np.float32) if text in SENTENCES else real(text, spec, *args, **kwargs)

    monkeypatch.setattr(synth, "synthesize", silent)
    manifests = _build(tmp_path, num_train=2, num_val=0, num_test=1)
    assert manifests["train"]["num_samples"] == 0 and manifests["train"]["shards"] == []
    assert manifests["train"]["rejected_counts"] == {"empty_audio": 2}
    assert manifests["validation"]["num_samples"] == 0


def test_espeak_missing_raises_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(EspeakNotFoundError, match="apt-get install espeak-ng") as info:
        _build(tmp_path)
    assert "brew install espeak-ng" in str(info.value)
    assert isinstance(info.value, RuntimeError)


@needs_espeak
def test_too_few_sentences(tmp_path):
    with pytest.raises(ValueError, match="cleaned sentences"):
        _build(tmp_path, num_train=100)


@needs_espeak
def test_voices_are_gmw_only():
    voices = synth.list_english_voices(probe=False)
    assert voices and all(v.startswith("gmw/") for v in voices)
    assert voices == sorted(voices)


def test_voice_settings_are_deterministic():
    voices = ["gmw/en", "gmw/en-US"]
    a = [synth.voice_for_position(i, 0, voices) for i in range(50)]
    assert a == [synth.voice_for_position(i, 0, voices) for i in range(50)]
    assert a != [synth.voice_for_position(i, 1, voices) for i in range(50)]
    assert [s.voice_file for s in a[:4]] == voices * 2
    assert len({s.variant for s in a}) > 5


# --------------------------------------------------------------------------------------- sentences


def test_clean_sentences():
    raw = [
        '  "The dog barked loudly"  ',
        "the dog barked LOUDLY",  # case-insensitive duplicate
        "Too short",
        "He paid 20 dollars for it",  # digit
        "She said \u201chello\u201d to everyone",  # non-ASCII
        "...was wont to complain that this is a cold world",
        "Is   it    raining outside?",
        " ".join(["word"] * 21),
    ]
    assert synth.clean_sentences(raw) == [
        "Is it raining outside?",
        "The dog barked loudly",
        "was wont to complain that this is a cold world",
    ]


def test_sentence_file(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("one two three\nfour five\none two three\n", encoding="utf-8")
    assert synth.resolve_sentences(path) == (["one two three"], "file:s.txt")


@needs_wordnet
def test_wordnet_sentences():
    sentences = synth.load_wordnet_sentences()
    assert len(sentences) > 30000
    assert sentences == sorted(sentences)
    assert len({s.casefold() for s in sentences}) == len(sentences)
    assert all(re.fullmatch(r"[A-Za-z ,.'?!;:\-]+", s) and 3 <= len(s.split()) <= 20 for s in sentences)


def test_wordnet_missing(tmp_path):
    with pytest.raises(synth.WordNetNotFoundError, match="apt-get install wordnet-base"):
        synth.load_wordnet_sentences(tmp_path)


# ------------------------------------------------------------------------------------------ shards


def test_flac_roundtrip():
    t = np.arange(16000, dtype=np.float32) / 16000
    wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    data = encode_flac(wave)
    assert data == encode_flac(wave)
    decoded, sr = decode_audio(data)
    assert sr == 16000 and decoded.shape == wave.shape and decoded.dtype == np.float32
    assert np.abs(decoded - wave).max() < 1e-4


def test_shard_writer_rolls_over_and_aborts_cleanly(tmp_path):
    flac = encode_flac(np.full(1600, 0.1, np.float32))
    with ShardWriter(tmp_path, "x", max_samples_per_shard=2) as writer:
        for i in range(5):
            writer.write(f"k{i}", flac, {"duration_s": 0.1})
    assert [s["num_samples"] for s in writer.shards] == [2, 2, 1]
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    with pytest.raises(ValueError, match="invalid sample key"):
        writer.write("a.b", flac, {"duration_s": 0.1})

    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "y", "y", 10) as writer:
        writer.write("k0", flac, {"duration_s": 0.1})
        raise RuntimeError("interrupted")
    assert list((tmp_path / "y").iterdir()) == []


def test_read_manifest_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json") as info:
        read_manifest(tmp_path)
    assert str(tmp_path) in str(info.value) and "aero_lightning.data.synth" in str(info.value)


def test_build_manifest_rejects_inconsistent_counts():
    with pytest.raises(ValueError):
        shards.build_manifest(
            corpus="c",
            split="s",
            shards=[{"name": "a", "num_samples": 2, "duration_s": 1.0}],
            durations_s=[1.0],
        )
