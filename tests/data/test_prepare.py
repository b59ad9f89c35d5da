"""Tests of corpus preparation (aero_lightning.data.prepare) and the corpora registry (aero_lightning.data.corpora)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from aero_lightning.data import prepare, readers
from aero_lightning.data.chat import DEFAULT_ASR_PROMPT, asr_messages
from aero_lightning.data.corpora import (
    CORPORA,
    DOMAINS,
    SOURCES,
    TASKS,
    CorpusSpec,
    corpora_markdown_table,
    get_corpus,
)
from aero_lightning.data.rejects import REJECT_REASONS
from aero_lightning.data.shards import file_sha256, read_manifest, verify_split
from aero_lightning.data.synth import VoiceSpec, find_espeak, synthesize

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

SR = 16000
FLAC_TOL = 1e-4  # 16-bit PCM quantisation (1/32768 ~ 3e-5) plus float rounding

# key, transcript (None: no transcript line), input rate in Hz, channels, kind
UTTERANCES = [
    ("19-198-0000", "THE CAT SAT ON THE MAT", 22050, 1, "ok"),
    ("19-198-0001", "HELLO WORLD", 16000, 1, "ok"),
    ("19-198-0002", "SHE SELLS SEA SHELLS", 22050, 2, "ok"),
    ("19-198-0003", "", 22050, 1, "ok"),  # empty transcript line -> empty_text
    ("19-227-0000", "A QUICK BROWN FOX", 22050, 1, "ok"),
    ("19-227-0001", "THIS FILE IS BROKEN", 22050, 1, "corrupt"),  # -> unreadable_audio
    ("26-495-0000", "THE LAZY DOG SLEPT", 16000, 2, "ok"),
    ("26-495-0001", "GOOD MORNING", 22050, 1, "ok"),
    ("26-495-0002", None, 22050, 1, "ok"),  # audio without transcript -> missing_transcript
]
EXPECTED_REJECTS = [
    ("19-198-0003", "empty_text"),
    ("19-227-0001", "unreadable_audio"),
    ("26-495-0002", "missing_transcript"),
]
# 9 inputs in key order, shard_size 2 -> chunks [0000,0001] [0002,0003] [227-0000,227-0001] [495-0000,0001] [0002]
EXPECTED_SHARD_COUNTS = [2, 1, 1, 2]  # the 5th chunk holds only a reject: stats file, no tar
PREFIX = "librispeech-train"


def _expected_wave(path: Path) -> np.ndarray:
    """What prepare should store for an input file: mono mean, soxr HQ to 16 kHz."""
    wave, rate = sf.read(path, dtype="float32", always_2d=True)  # (T, C)
    wave = wave.mean(axis=1, dtype=np.float32)
    if rate != SR:
        wave = soxr.resample(wave, rate, SR, quality="HQ")
    return np.asarray(wave, dtype=np.float32)


def _read_shard(path: Path) -> list[tuple[str, np.ndarray, int, dict]]:
    """``(key, waveform (T,), sample rate, record)`` per sample, in tar order; checks member pairing."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
    keys = [n[: -len(".flac")] for n in names if n.endswith(".flac")]
    assert names == [f"{k}.{ext}" for k in keys for ext in ("flac", "json")]
    samples = []
    for key in keys:
        info = sf.info(io.BytesIO(members[f"{key}.flac"]))
        assert info.channels == 1 and info.subtype == "PCM_16"
        wave, rate = sf.read(io.BytesIO(members[f"{key}.flac"]), dtype="float32")
        samples.append((key, wave, rate, json.loads(members[f"{key}.json"])))
    return samples


@pytest.fixture(scope="module")
def librispeech_dir(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, Path]]]:
    """A tiny LibriSpeech-layout folder; returns ``(root, {key: (transcript, flac path)})`` of valid inputs."""
    espeak = find_espeak()
    root = tmp_path_factory.mktemp("ls") / "LibriSpeech" / "train-clean-100"
    transcripts: dict[Path, list[str]] = {}
    valid = {}
    for i, (key, text, rate, channels, kind) in enumerate(UTTERANCES):
        speaker, chapter, _ = key.split("-")
        folder = root / speaker / chapter
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.flac"
        if kind == "corrupt":
            path.write_bytes(b"fLaC\x00\x00\x00\x22" + bytes(range(256)) * 4)
        else:
            spec = VoiceSpec("gmw/en-US", ("m1", "f2", "m3")[i % 3], 220, 40 + 5 * i)
            wave = synthesize(text or "empty", spec, espeak, sample_rate=rate)  # (T,)
            data = np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave  # (T, 2) or (T,)
            sf.write(path, data, rate, format="FLAC", subtype="PCM_16")
            if text:
                valid[key] = (text, path)
        if text is not None:
            transcripts.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(f"{key} {text}")
    for trans, lines in transcripts.items():
        trans.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, valid


def _snapshot(out: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("*.tar"))
    }


@needs_espeak
def test_prepare_librispeech_folder_shards_rejects_and_resume(librispeech_dir, tmp_path, caplog):
    root, valid = librispeech_dir
    out = tmp_path / "out"
    args = [
        "corpus=librispeech",
        f"source={root}",
        f"out={out}",
        "split=train",
        "workers=2",
        "shard_size=2",
        "progress=false",
    ]
    caplog.set_level(logging.INFO, logger="aero_lightning.data.prepare")
    manifest = prepare.main(args)

    names = [f"{PREFIX}-{i:06d}.tar" for i in range(4)]
    assert manifest == read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == names
    assert [s["num_samples"] for s in manifest["shards"]] == EXPECTED_SHARD_COUNTS
    assert sorted(p.name for p in out.glob("*.tar")) == names
    assert sorted(p.name for p in out.glob("*.stats.json")) == [
        f"{PREFIX}-{i:06d}.stats.json" for i in range(5)
    ]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.partial"))
    assert manifest["num_samples"] == 6 == len(valid)
    assert [(r["key"], r["reason"]) for r in manifest["rejected"]] == EXPECTED_REJECTS
    assert manifest["rejected_counts"] == {"empty_text": 1, "missing_transcript": 1, "unreadable_audio": 1}
    assert manifest["rejected"][0]["detail"] == "empty text for 19/198/19-198-0003.flac"
    assert manifest["rejected"][2]["detail"] == "no text for 26/495/26-495-0002.flac"
    corrupt_detail = manifest["rejected"][1]["detail"]
    assert (
        corrupt_detail.startswith("19/227/19-227-0001.flac: LibsndfileError")
        and " at 0x" not in corrupt_detail
    )
    assert manifest["task"] == "asr" and manifest["domain"] == "speech" and manifest["sample_rate"] == SR
    assert manifest["build_params"]["shard_size"] == 2 and manifest["build_params"]["num_inputs"] == 9

    # every member: 16 kHz mono FLAC, exact duration, exact transcript, waveform = mono + soxr HQ of the input
    seen, durations = [], []
    for shard in manifest["shards"]:
        samples = _read_shard(out / shard["name"])
        assert len(samples) == shard["num_samples"]
        shard_total = 0.0
        for key, wave, rate, record in samples:
            text, path = valid[key]
            expected = _expected_wave(path)
            assert rate == SR and wave.ndim == 1
            assert wave.size == expected.size
            np.testing.assert_allclose(wave, expected, atol=FLAC_TOL)
            assert record["duration_s"] == wave.size / SR
            assert record["text"] == text
            assert record["messages"] == asr_messages(text, DEFAULT_ASR_PROMPT)
            assert (
                record["task"] == "asr" and record["corpus"] == "librispeech" and record["language"] == "en"
            )
            speaker, chapter, _ = key.split("-")
            assert record["source"] == f"{speaker}/{chapter}/{key}.flac"
            assert record["source_sample_rate_hz"] == sf.info(path).samplerate
            seen.append(key)
            durations.append(record["duration_s"])
            shard_total += record["duration_s"]
        assert shard["duration_s"] == round(shard_total, 6)
    assert seen == sorted(valid)
    assert manifest["duration_s"] == round(sum(durations), 6)
    assert manifest["hours"] == round(sum(durations) / 3600, 6)
    assert sum(manifest["duration_histogram"]["counts"]) == 6

    # the all-rejected last chunk: stats, no tar
    last = json.loads((out / f"{PREFIX}-000004.stats.json").read_text())
    assert last["shard"] is None and last["num_samples"] == 0 and last["durations_s"] == []
    assert [(r["key"], r["reason"]) for r in last["rejected"]] == [("26-495-0002", "missing_transcript")]
    second = json.loads((out / f"{PREFIX}-000001.stats.json").read_text())
    assert second["keys"] == ["19-198-0002"] and (second["input_start"], second["input_stop"]) == (2, 4)

    # re-run: everything skipped, files untouched, manifest byte-identical
    manifest_bytes = (out / "manifest.json").read_bytes()
    before = _snapshot(out)
    caplog.clear()
    assert prepare.main(args) == manifest
    assert "5 already finished (skipped), 0 to build" in caplog.text
    assert _snapshot(out) == before
    assert (out / "manifest.json").read_bytes() == manifest_bytes

    # delete one shard: only it is rebuilt, byte-identical
    (out / names[1]).unlink()
    caplog.clear()
    assert prepare.main(args) == manifest
    assert "4 already finished (skipped), 1 to build" in caplog.text
    after = _snapshot(out)
    assert after[names[1]][2] == before[names[1]][2]
    assert {n: v for n, v in after.items() if n != names[1]} == {
        n: v for n, v in before.items() if n != names[1]
    }
    assert (out / "manifest.json").read_bytes() == manifest_bytes

    # one in-process worker writes the same bytes and manifest as two worker processes
    out1 = tmp_path / "out1"
    args1 = [a for a in args if not a.startswith(("out=", "workers="))] + [f"out={out1}", "workers=1"]
    assert prepare.main(args1) == manifest
    assert {n: v[2] for n, v in _snapshot(out1).items()} == {n: v[2] for n, v in before.items()}
    assert (out1 / "manifest.json").read_bytes() == manifest_bytes


@needs_espeak
def test_prepare_rebuilds_when_parameters_change(librispeech_dir, tmp_path):
    root, valid = librispeech_dir
    out = tmp_path / "out"
    common = dict(source=root, workers=1, progress=False)
    first = prepare.prepare_corpus("librispeech", out, shard_size=2, **common)
    assert len(first["shards"]) == 4
    second = prepare.prepare_corpus("librispeech", out, shard_size=4, limit=7, **common)
    # 7 inputs in chunks of 4: [198-0000..0003] [227-0000, 227-0001, 495-0000]
    assert [s["num_samples"] for s in second["shards"]] == [3, 2]
    assert sorted(p.name for p in out.glob(f"{PREFIX}-*")) == [
        f"{PREFIX}-000000.stats.json",
        f"{PREFIX}-000000.tar",
        f"{PREFIX}-000001.stats.json",
        f"{PREFIX}-000001.tar",
    ]
    assert [(r["key"], r["reason"]) for r in second["rejected"]] == EXPECTED_REJECTS[:2]


def _wav_bytes(wave: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _tone(seconds: float, rate: int, freq_hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def test_prepare_hf_saved_dataset(tmp_path):
    from datasets import Audio, Dataset, DatasetDict

    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    sf.write(audio_dir / "a.flac", _tone(1.25, 16000), 16000, format="FLAC", subtype="PCM_16")
    stereo_8k = np.stack([_tone(0.75, 8000, 300), _tone(0.75, 8000, 500)], axis=1)  # (T, 2)
    rows = [  # id, audio value, text, expected waveform (None: rejected)
        ("utt-a", {"bytes": None, "path": str(audio_dir / "a.flac")}, "alpha beta", None),
        ("utt-b", {"bytes": _wav_bytes(stereo_8k, 8000), "path": "b.wav"}, "gamma", None),
        ("utt-c", {"bytes": b"RIFF not really a wav file", "path": "c.wav"}, "broken", None),
        ("utt-d", {"bytes": _wav_bytes(_tone(0.5, 16000), 16000), "path": "d.wav"}, "   ", None),
        ("utt-e", {"bytes": _wav_bytes(_tone(3.0, 22050), 22050), "path": "e.wav"}, "too long", None),
        ("utt/f.1", {"bytes": _wav_bytes(_tone(2.0, 48000, 1000), 48000), "path": "f.wav"}, " delta ", None),
    ]
    train = Dataset.from_dict(
        {"id": [r[0] for r in rows], "audio": [r[1] for r in rows], "text": [r[2] for r in rows]}
    ).cast_column("audio", Audio())
    other = Dataset.from_dict({"id": ["x"], "audio": [rows[1][1]], "text": ["other split"]}).cast_column(
        "audio", Audio()
    )
    saved = tmp_path / "saved"
    DatasetDict({"train": train, "test": other}).save_to_disk(str(saved))
    shutil.rmtree(audio_dir)  # save_to_disk embedded the file's bytes

    out = tmp_path / "out"
    manifest = prepare.prepare_corpus(
        "librispeech", out, saved, shard_size=4, workers=2, max_duration_s=2.5, progress=False
    )
    assert [s["name"] for s in manifest["shards"]] == [f"{PREFIX}-000000.tar", f"{PREFIX}-000001.tar"]
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 1]
    assert [(r["key"], r["reason"]) for r in manifest["rejected"]] == [
        ("utt-c", "unreadable_audio"),
        ("utt-d", "empty_text"),
        ("utt-e", "too_long"),
    ]
    assert manifest["build_params"]["source"]["hf_split"] == "train"
    expected = {
        "utt-a": ("alpha beta", _tone(1.25, 16000), 16000),
        "utt-b": ("gamma", soxr.resample(stereo_8k.mean(axis=1), 8000, SR, quality="HQ"), 8000),
        "utt_f_1": ("delta", soxr.resample(_tone(2.0, 48000, 1000), 48000, SR, quality="HQ"), 48000),
    }
    got = [s for shard in manifest["shards"] for s in _read_shard(out / shard["name"])]
    assert [k for k, *_ in got] == list(expected)
    for key, wave, rate, record in got:
        text, wave_in, rate_in = expected[key]
        assert rate == SR and wave.size == wave_in.size
        np.testing.assert_allclose(wave, wave_in, atol=FLAC_TOL)
        assert record["duration_s"] == wave.size / SR
        assert record["text"] == text and record["messages"] == asr_messages(text)
        assert record["source_sample_rate_hz"] == rate_in
    assert [r["source"] for *_, r in got] == ["saved:train#0", "saved:train#1", "saved:train#5"]
    assert [r["duration_s"] for *_, r in got] == [1.25, 0.75, 2.0]
    assert manifest["duration_s"] == 4.0

    # the other split of the same DatasetDict, by our split name
    test_manifest = prepare.prepare_corpus(
        "librispeech", tmp_path / "out_test", saved, split="test", workers=1
    )
    assert test_manifest["num_samples"] == 1
    assert test_manifest["shards"][0]["name"] == "librispeech-test-000000.tar"


@pytest.mark.parametrize("task", ["aqa", "classify", "instruct"])
def test_prepare_hf_non_asr_tasks(tmp_path, task):
    from datasets import Audio, ClassLabel, Dataset

    waves = [_wav_bytes(_tone(0.5 + 0.25 * i, 16000, 200 + 100 * i), 16000) for i in range(3)]
    audio = [{"bytes": w, "path": f"{i}.wav"} for i, w in enumerate(waves)]
    if task == "aqa":  # folder-only registry entry: columns come from the overrides
        data = {"clip": audio, "q": ["Is it loud?", "What animal is it?", ""], "a": ["yes", "a dog", "x"]}
        corpus, columns = "clotho_aqa", {"audio": "clip", "text": "a", "question": "q"}
    elif task == "classify":
        data = {"audio": audio, "genre": [2, 0, 1], "file": ["x.0.wav", "y.1.wav", "z.2.wav"]}
        corpus, columns = "gtzan", None
    else:
        data = {
            "question_audio": audio,
            "answer": ["Sure.", "", "No."],
            "question": ["Help?", "Hm?", "Well?"],
        }
        corpus, columns = "voiceassistant_400k", None
    ds = Dataset.from_dict(data).cast_column(next(iter(data)), Audio())
    if task == "classify":
        ds = ds.cast_column("genre", ClassLabel(names=["blues", "jazz", "rock"]))
    ds.save_to_disk(str(tmp_path / "saved"))

    manifest = prepare.prepare_corpus(
        corpus, tmp_path / "out", tmp_path / "saved", workers=1, columns=columns
    )
    spec = get_corpus(corpus)
    records = [r for shard in manifest["shards"] for *_, r in _read_shard(tmp_path / "out" / shard["name"])]
    assert all(r["task"] == task and r["corpus"] == corpus for r in records)
    if task == "aqa":
        assert [(r["key"], r["reason"]) for r in manifest["rejected"]] == [("000000002", "empty_question")]
        assert [r["text"] for r in records] == ["yes", "a dog"]
        assert [r["question"] for r in records] == ["Is it loud?", "What animal is it?"]
        assert records[1]["messages"] == asr_messages("a dog", "What animal is it?")
    elif task == "classify":
        assert manifest["rejected"] == []
        assert [r["text"] for r in records] == ["rock", "blues", "jazz"]
        assert records[0]["messages"] == asr_messages("rock", spec.prompts[0])
        assert manifest["domain"] == "music"
    else:
        assert [(r["key"], r["reason"]) for r in manifest["rejected"]] == [("000000001", "empty_text")]
        assert [r["text"] for r in records] == ["Sure.", "No."]
        assert [r["instruction_text"] for r in records] == ["Help?", "Well?"]
        assert records[0]["messages"] == [
            {"role": "user", "content": [{"type": "audio"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]},
        ]


def test_prepare_hub_id_uses_registry_config_and_split(tmp_path, monkeypatch):
    import datasets
    from datasets import Audio, Dataset

    calls = []
    fake = Dataset.from_dict(
        {
            "id": ["1-2-0000", "1-2-0001"],
            "audio": [{"bytes": _wav_bytes(_tone(0.5, 16000), 16000), "path": "x.wav"}] * 2,
            "text": ["ONE", "TWO"],
            "speaker_id": [1, 1],
        }
    ).cast_column("audio", Audio())

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    manifest = prepare.main([f"out={tmp_path / 'out'}", "corpus=librispeech", "workers=1", "revision=abc"])
    assert calls == [
        ("openslr/librispeech_asr", "all", "train.clean.100+train.clean.360+train.other.500", "abc")
    ]
    assert manifest["num_samples"] == 2 and manifest["rejected"] == []
    records = [r for *_, r in _read_shard(tmp_path / "out" / manifest["shards"][0]["name"])]
    assert [(r["text"], r["source"]) for r in records] == [
        ("ONE", "openslr/librispeech_asr:all:train.clean.100+train.clean.360+train.other.500#0"),
        ("TWO", "openslr/librispeech_asr:all:train.clean.100+train.clean.360+train.other.500#1"),
    ]
    assert manifest["build_params"]["source"]["kind"] == "hub"

    calls.clear()
    prepare.prepare_corpus("librispeech", tmp_path / "o2", split="test_other", hf_config="other", workers=1)
    assert calls == [("openslr/librispeech_asr", "other", "test.other", None)]


def test_prepare_errors(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(NotImplementedError, match="'tedlium' of corpus 'tedlium3' is not implemented"):
        prepare.prepare_corpus("tedlium3", tmp_path / "o1", plain)
    with pytest.raises(ValueError, match="no official folder layout"):
        prepare.prepare_corpus("gigaspeech", tmp_path / "o2", plain)
    with pytest.raises(FileNotFoundError, match="no \\*.trans.txt or \\*.flac"):
        prepare.prepare_corpus("librispeech", tmp_path / "o3", plain)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare.prepare_corpus("librispeech", tmp_path / "o4", tmp_path / "missing")
    with pytest.raises(ValueError, match="has no HF id"):
        prepare.prepare_corpus("audiocaps", tmp_path / "o5")
    with pytest.raises(KeyError, match="unknown corpus 'nope'"):
        prepare.prepare_corpus("nope", tmp_path / "o6", plain)
    with pytest.raises(ValueError, match="shard_size"):
        prepare.prepare_corpus("librispeech", tmp_path / "o7", plain, shard_size=0)


def test_parse_args():
    kwargs = prepare.parse_args(
        ["corpus=ami_ihm", "out=/x", "source=edinburghcstr/ami", "workers=3", "limit=10", "shard_size=5"]
        + [
            "max_duration_s=30.5",
            "prompt=Transcribe: a=b",
            "text_column=txt",
            "id_column=uid",
            "progress=false",
        ]
    )
    assert kwargs == {
        "corpus": "ami_ihm",
        "out_dir": "/x",
        "source": "edinburghcstr/ami",
        "workers": 3,
        "limit": 10,
        "shard_size": 5,
        "max_duration_s": 30.5,
        "prompt": "Transcribe: a=b",
        "columns": {"text": "txt", "id": "uid"},
        "progress": False,
    }
    for bad, message in [
        (["corpus=a"], "out= is required"),
        (["corpus=a", "out=b", "shards=3"], "unknown key 'shards'"),
        (["corpus=a", "out=b", "workers=many"], "bad value for workers"),
        (["corpus=a", "out=b", "workers"], "expected key=value"),
        (["corpus=a", "out=b", "out=c"], "out given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            prepare.parse_args(bad)
    with pytest.raises(SystemExit) as exc:
        prepare.main(["corpus=librispeech"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------- registry

REQUIRED = {
    "librispeech",
    "gigaspeech",
    "peoples_speech",
    "common_voice_en",
    "voxpopuli_en",
    "spgispeech",
    "tedlium3",
    "ami_ihm",
    "mls_en",
    "audiocaps",
    "clotho",
    "wavcaps",
    "musiccaps",
    "clotho_aqa",
    "openaqa",
}


def test_registry_entries_are_valid():
    assert len(CORPORA) >= 22
    assert REQUIRED <= set(CORPORA)
    assert set(TASKS) == {spec.task for spec in CORPORA.values()}
    assert {s.domain for s in CORPORA.values() if s.task == "classify"} == {"speech", "sound", "music"}
    for name, spec in CORPORA.items():
        assert spec.name == name and get_corpus(name) is spec
        assert spec.task in TASKS and spec.domain in DOMAINS and spec.source in SOURCES
        assert spec.hours > 0 and spec.license and spec.url.startswith(("https://", "http://"))
        if spec.source == "hf":
            assert spec.hf_id and spec.hf_id.count("/") == 1
        else:
            assert spec.folder_layout
        if spec.hf_id:
            assert {"audio", "text"} <= set(spec.columns) and spec.hf_splits
        if spec.task == "asr":
            assert spec.prompts == (DEFAULT_ASR_PROMPT,) and spec.domain == "speech"
    ls = get_corpus("librispeech")
    assert (ls.hours, ls.folder_layout, ls.hf_id) == (960.0, "librispeech", "openslr/librispeech_asr")
    assert ls.folder_layout in readers.FOLDER_READERS


def test_get_corpus_unknown_lists_names():
    with pytest.raises(KeyError) as exc:
        get_corpus("librispeech_9000")
    assert (
        "librispeech_9000" in str(exc.value)
        and "gigaspeech" in str(exc.value)
        and "wavcaps" in str(exc.value)
    )


def test_corpus_spec_validation():
    base = dict(
        name="x", task="asr", domain="speech", license="MIT", hours=1.0, prompts=("p",), url="https://x"
    )
    CorpusSpec(source="folder", folder_layout="librispeech", **base)
    bad = [
        ({**base, "task": "sing"}, {"source": "folder", "folder_layout": "l"}, "task 'sing'"),
        ({**base, "hours": 0.0}, {"source": "folder", "folder_layout": "l"}, "hours must be > 0"),
        (base, {"source": "hf"}, "source 'hf' needs hf_id"),
        (base, {"source": "folder"}, "source 'folder' needs folder_layout"),
        (base, {"source": "hf", "hf_id": "a/b", "columns": {"audio": "a"}}, "needs 'audio' and 'text'"),
        ({**base, "task": "aqa"}, {"source": "folder", "folder_layout": "l"}, "contain '{question}'"),
    ]
    for kwargs, extra, message in bad:
        with pytest.raises(ValueError, match=message):
            CorpusSpec(**kwargs, **extra)


def test_corpora_markdown_table():
    table = corpora_markdown_table()
    lines = table.splitlines()
    assert lines[0] == "| Corpus | Task | Source | Hours | Licence |"
    assert len(lines) == 2 + len(CORPORA)
    rows = lines[2:]
    for row, spec in zip(rows, CORPORA.values()):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5
        assert cells[0] == f"[{spec.name}]({spec.url})"
        assert cells[4] == spec.license
    assert rows[0] == (
        "| [librispeech](https://www.openslr.org/12) | asr (speech) | `folder:librispeech` | 960 | CC-BY-4.0 |"
    )


# --------------------------------------------------------------------------------- table folder layouts


def _write_audio(path: Path, seconds: float, rate: int, freq_hz: float = 440.0) -> Path:
    """A short tone at ``path`` (format from the suffix, 16-bit PCM)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _tone(seconds, rate, freq_hz), rate, subtype="PCM_16")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _all_samples(out: Path, manifest: dict) -> list[tuple[str, np.ndarray, int, dict]]:
    return [s for shard in manifest["shards"] for s in _read_shard(out / shard["name"])]


def _rejects(manifest: dict) -> list[tuple[str, str]]:
    return [(r["key"], r["reason"]) for r in manifest["rejected"]]


def test_prepare_audiocaps_table_layout(tmp_path):
    root = tmp_path / "audiocaps"
    _write_csv(
        root / "train.csv",
        ["audiocap_id", "youtube_id", "start_time", "caption"],
        [
            ["91139", "r1nicOVtvkQ", "130", "A woman talks nearby as water pours"],
            ["58146", "-9Ab_cD3efG", "30", "Birds chirp, then a dog barks"],
            ["11", "zzzMissing1", "0", "A car passes by"],
            ["207", "Xy0Q8vKb1aA", "50", " Rain falls on a roof "],
        ],
    )
    # clips named as different download tools do: <id>.wav, Y<id>.flac, <id>_<start>.wav; 44.1 kHz
    audio = {
        "91139": _write_audio(root / "audio" / "r1nicOVtvkQ.wav", 0.5, 44100, 300),
        "58146": _write_audio(root / "audio" / "Y-9Ab_cD3efG.flac", 0.75, 44100, 500),
        "207": _write_audio(root / "audio" / "sub" / "Xy0Q8vKb1aA_50.wav", 0.25, 44100, 700),
    }
    _write_audio(root / "audio" / "unrelated.wav", 0.1, 44100)
    out = tmp_path / "out"
    args = [f"source={root}", f"out={out}", "corpus=audiocaps", "workers=2", "shard_size=2", "progress=false"]
    manifest = prepare.main(args)

    spec = get_corpus("audiocaps")
    # inputs sorted by key: 11 (missing), 207, 58146, 91139 -> chunks [11, 207] [58146, 91139]
    assert [s["num_samples"] for s in manifest["shards"]] == [1, 2]
    assert manifest["num_samples"] == 3 and manifest["build_params"]["num_inputs"] == 4
    assert _rejects(manifest) == [("11", "missing_audio")]
    assert manifest["rejected"][0]["detail"] == (
        "train.csv:3: no audio file 'zzzMissing1' / 'YzzzMissing1' / 'zzzMissing1_0' / '11'"
    )
    assert manifest["rejected_counts"] == {"missing_audio": 1}
    assert manifest["task"] == "caption" and manifest["domain"] == "sound"
    assert manifest["build_params"]["source"]["table"]["metadata"]["train"] == "train.csv"
    expected = {
        "207": ("Rain falls on a roof", spec.prompts[1], "audio/sub/Xy0Q8vKb1aA_50.wav"),
        "58146": ("Birds chirp, then a dog barks", spec.prompts[0], "audio/Y-9Ab_cD3efG.flac"),
        "91139": ("A woman talks nearby as water pours", spec.prompts[1], "audio/r1nicOVtvkQ.wav"),
    }
    samples = _all_samples(out, manifest)
    assert [k for k, *_ in samples] == list(expected)
    for key, wave, rate, record in samples:
        text, prompt, source = expected[key]
        reference = _expected_wave(audio[key])
        assert rate == SR and wave.size == reference.size
        np.testing.assert_allclose(wave, reference, atol=FLAC_TOL)
        assert record["text"] == text and record["messages"] == asr_messages(text, prompt)
        assert (record["task"], record["corpus"], record["language"]) == ("caption", "audiocaps", "und")
        assert record["source"] == source and record["source_sample_rate_hz"] == 44100

    # no other split's csv in the folder: a clear error naming the expected layout
    with pytest.raises(FileNotFoundError, match="holds no 'val.csv'.*audiocap_id"):
        prepare.prepare_corpus("audiocaps", tmp_path / "o2", root, split="validation", workers=1)
    with pytest.raises(ValueError, match="no split 'dev'"):
        prepare.prepare_corpus("audiocaps", tmp_path / "o3", root, split="dev", workers=1)
    # ... unless metadata= names it
    extra = prepare.prepare_corpus(
        "audiocaps", tmp_path / "o4", root, split="dev", metadata="train.csv", workers=1, limit=2
    )
    assert extra["num_samples"] == 1 and _rejects(extra) == [("11", "missing_audio")]


CLOTHO_CAPTIONS = {
    "Rain, on a tin roof.wav": [f"Rain drums on metal {i}." for i in range(1, 6)],
    "birds01.wav": [
        "Birds sing.",
        "Many birds chirp loudly.",
        "A bird calls.",
        " Birds tweet. ",
        "Chirping.",
    ],
    "gone.wav": [f"Missing clip caption {i}." for i in range(1, 6)],
}


def test_prepare_clotho_five_captions_per_clip(tmp_path):
    root = tmp_path / "clotho"
    _write_csv(
        root / "clotho_captions_development.csv",
        ["file_name"] + [f"caption_{i}" for i in range(1, 6)],
        [[name, *captions] for name, captions in CLOTHO_CAPTIONS.items()],
    )
    _write_audio(root / "development" / "Rain, on a tin roof.wav", 0.5, 44100, 250)
    _write_audio(root / "development" / "birds01.wav", 0.5, 44100, 2000)
    manifest = prepare.prepare_corpus("clotho", tmp_path / "out", root, workers=1, shard_size=100)

    stems = {"Rain, on a tin roof.wav": "Rain_on_a_tin_roof", "birds01.wav": "birds01", "gone.wav": "gone"}
    samples = _all_samples(tmp_path / "out", manifest)
    expected = [
        (f"{stems[name]}_c{i}", captions[i - 1].strip(), f"development/{name}")
        for name, captions in CLOTHO_CAPTIONS.items()
        if name != "gone.wav"
        for i in range(1, 6)
    ]
    assert [(k, r["text"], r["source"]) for k, _, _, r in samples] == expected
    assert manifest["num_samples"] == 10
    assert _rejects(manifest) == [(f"gone_c{i}", "missing_audio") for i in range(1, 6)]
    prompts = get_corpus("clotho").prompts
    assert [r["messages"][0]["content"][1]["text"] for *_, r in samples] == [
        prompts[i % 2] for i in range(10)
    ]
    # the five samples of one clip hold the same audio
    assert all(np.array_equal(samples[0][1], s[1]) for s in samples[1:5])


def test_prepare_esc50_folder_labels_and_folds(tmp_path):
    root = tmp_path / "ESC-50-master"
    rows = [
        ["1-100032-A-0.wav", "1", "0", "dog", "True", "100032", "A"],
        ["1-110389-A-0.wav", "1", "0", "dog", "True", "110389", "A"],
        ["2-102414-A-17.wav", "2", "17", "pouring_water", "False", "102414", "A"],
    ]
    _write_csv(
        root / "meta" / "esc50.csv",
        ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
        rows,
    )
    for i, row in enumerate(rows):
        _write_audio(root / "audio" / row[0], 0.5, 44100, 200 + 100 * i)
    prompt = get_corpus("esc50").prompts[0]

    manifest = prepare.prepare_corpus("esc50", tmp_path / "out", root, workers=1)
    records = [(k, r) for k, _, _, r in _all_samples(tmp_path / "out", manifest)]
    assert [(k, r["text"]) for k, r in records] == [
        ("1-100032-A-0", "dog"),
        ("1-110389-A-0", "dog"),
        ("2-102414-A-17", "pouring_water"),
    ]
    assert all(r["messages"] == asr_messages(r["text"], prompt) for _, r in records)
    assert all(r["task"] == "classify" and r["duration_s"] == 0.5 for _, r in records)
    assert manifest["rejected"] == [] and manifest["build_params"]["source"]["kind"] == "folder"

    fold2 = prepare.prepare_corpus("esc50", tmp_path / "fold2", root, split="fold2", workers=1)
    assert [s["name"] for s in fold2["shards"]] == ["esc50-fold2-000000.tar"]
    assert [r["text"] for *_, r in _all_samples(tmp_path / "fold2", fold2)] == ["pouring_water"]


def test_prepare_crema_d_labels_from_file_names(tmp_path):
    root = tmp_path / "CREMA-D"
    for name, freq in [
        ("1001_DFA_ANG_XX.wav", 300),
        ("1001_IEO_HAP_HI.wav", 400),
        ("1091_TSI_SAD_LO.wav", 500),
    ]:
        _write_audio(root / "AudioWAV" / name, 0.5, 16000, freq)
    (root / "AudioWAV" / "1002_DFA_NEU_XX.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")  # unreadable
    _write_audio(root / "AudioWAV" / "readme_tone.wav", 0.1, 16000)  # name does not match: not an input
    (root / "AudioMP3").mkdir()
    (root / "AudioMP3" / "1001_DFA_ANG_XX.mp3").write_bytes(b"not globbed")

    manifest = prepare.prepare_corpus("crema_d", tmp_path / "out", root, workers=1)
    records = [(k, r) for k, _, _, r in _all_samples(tmp_path / "out", manifest)]
    assert [(k, r["text"], r["source"]) for k, r in records] == [
        ("1001_DFA_ANG_XX", "angry", "AudioWAV/1001_DFA_ANG_XX.wav"),
        ("1001_IEO_HAP_HI", "happy", "AudioWAV/1001_IEO_HAP_HI.wav"),
        ("1091_TSI_SAD_LO", "sad", "AudioWAV/1091_TSI_SAD_LO.wav"),
    ]
    prompt = get_corpus("crema_d").prompts[0]
    assert all(r["messages"] == asr_messages(r["text"], prompt) for _, r in records)
    assert _rejects(manifest) == [("1002_DFA_NEU_XX", "unreadable_audio")]
    assert manifest["build_params"]["num_inputs"] == 4


def test_prepare_table_layouts_questions_label_files_and_line_regex(tmp_path):
    # Clotho-AQA: question column; three annotators' answers to one question -> deduplicated keys
    aqa = tmp_path / "clotho_aqa"
    _write_csv(
        aqa / "clotho_aqa_train.csv",
        ["file_name", "QuestionText", "answer", "confidence"],
        [
            ["dog.wav", "Is a dog barking?", "yes", "yes"],
            ["dog.wav", "Is a dog barking?", "yes", "maybe"],
            ["dog.wav", "Is a dog barking?", "no", "no"],
            ["dog.wav", "", "yes", "yes"],
        ],
    )
    _write_audio(aqa / "audio_files" / "dog.wav", 0.25, 44100)
    manifest = prepare.prepare_corpus("clotho_aqa", tmp_path / "o_aqa", aqa, workers=1)
    records = [r for *_, r in _all_samples(tmp_path / "o_aqa", manifest)]
    assert [(r["question"], r["text"]) for r in records] == [
        ("Is a dog barking?", a) for a in ("yes", "yes", "no")
    ]
    assert records[2]["messages"] == asr_messages("no", "Is a dog barking?")
    assert manifest["shards"] and [k for k, *_ in _all_samples(tmp_path / "o_aqa", manifest)] == [
        "dog",
        "dog_2",
        "dog_3",
    ]
    assert _rejects(manifest) == [("dog_4", "empty_question")]

    # AudioSet: '#' header lines, header-less quoted label lists, machine ids -> names via the label file
    aset = tmp_path / "audioset"
    aset.mkdir()
    (aset / "eval_segments.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:25 2017\n"
        "# num_ytids=2, num_segs=2, num_unique_labels=3, num_positive_labels=3\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/07q6cd_"\n'
        'AAAAAAAAAAA, 30.000, 40.000, "/m/xxxxx"\n'
    )
    _write_csv(
        aset / "class_labels_indices.csv",
        ["index", "mid", "display_name"],
        [["0", "/m/068hy", "Domestic animals, pets"], ["1", "/m/07q6cd_", "Squeak"]],
    )
    _write_audio(aset / "eval" / "Y--4gqARaEJE.wav", 0.25, 32000)
    manifest = prepare.prepare_corpus("audioset", tmp_path / "o_as", aset, split="test", workers=1)
    records = [(k, r) for k, _, _, r in _all_samples(tmp_path / "o_as", manifest)]
    assert [(k, r["text"]) for k, r in records] == [("--4gqARaEJE", "Domestic animals, pets, Squeak")]
    assert _rejects(manifest) == [("AAAAAAAAAAA", "missing_audio")]

    # IEMOCAP: summary lines picked out of EmoEvaluation files by regex; 'xxx' is unlabelled
    iemo = tmp_path / "IEMOCAP_full_release"
    evaluation = iemo / "Session1" / "dialog" / "EmoEvaluation"
    evaluation.mkdir(parents=True)
    (evaluation / "Ses01F_impro01.txt").write_text(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        "C-E2:\tNeutral;\t()\n"
        "[10.0100 - 11.3925]\tSes01F_impro01_F001\txxx\t[2.5000, 2.5000, 2.5000]\n"
        "[14.8872 - 18.0175]\tSes01F_impro01_M001\tfru\t[2.0000, 3.5000, 3.5000]\n"
    )
    wav = iemo / "Session1" / "sentences" / "wav" / "Ses01F_impro01"
    for utt in ("Ses01F_impro01_F000", "Ses01F_impro01_F001", "Ses01F_impro01_M001"):
        _write_audio(wav / f"{utt}.wav", 0.25, 16000)
    _write_audio(iemo / "Session1" / "dialog" / "wav" / "Ses01F_impro01.wav", 0.5, 16000)  # not a sentence
    manifest = prepare.prepare_corpus("iemocap", tmp_path / "o_iemo", iemo, split="session1", workers=1)
    records = [(k, r) for k, _, _, r in _all_samples(tmp_path / "o_iemo", manifest)]
    assert [(k, r["text"]) for k, r in records] == [
        ("Ses01F_impro01_F000", "neutral"),
        ("Ses01F_impro01_M001", "frustrated"),
    ]
    assert _rejects(manifest) == [("Ses01F_impro01_F001", "unlabelled")]
    assert "'xxx' has no usable class" in manifest["rejected"][0]["detail"]


def test_table_layout_errors_and_registry_coverage(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no 'clotho_captions_development.csv'"):
        prepare.prepare_corpus("clotho", tmp_path / "o1", plain)
    with pytest.raises(
        NotImplementedError, match="'instructs2s' of corpus 'instructs2s_200k' is not implemented"
    ):
        prepare.prepare_corpus("instructs2s_200k", tmp_path / "o2", plain)
    _write_csv(plain / "train.csv", ["ytid", "caption"], [["abc", "x"]])
    with pytest.raises(
        ValueError, match=r"train.csv lacks the columns \['audiocap_id', 'start_time', 'youtube_id'\]"
    ):
        prepare.prepare_corpus("audiocaps", tmp_path / "o3", plain)
    with pytest.raises(ValueError, match="metadata= applies to table folder layouts"):
        prepare.prepare_corpus("librispeech", tmp_path / "o4", plain, metadata="x.csv")

    # every folder layout in the registry is readable or says why not
    for spec in CORPORA.values():
        if spec.folder_layout is None:
            continue
        readable = spec.folder_table is not None or spec.folder_layout in readers.FOLDER_READERS
        assert readable != (spec.folder_layout in readers.UNSUPPORTED_LAYOUTS), spec.name
        if spec.folder_table is not None:
            assert "train" in spec.folder_table.metadata, spec.name
            for split in spec.folder_table.metadata:
                readers.describe_table(spec.folder_table, split)
    assert sorted(readers.UNSUPPORTED_LAYOUTS) == ["instructs2s", "tedlium"]
    assert "missing_audio" in REJECT_REASONS and "unlabelled" in REJECT_REASONS


@needs_espeak
def test_a_damaged_finished_shard_is_rebuilt_and_verify_reports_it(librispeech_dir, tmp_path, caplog, capsys):
    root, _ = librispeech_dir
    out = tmp_path / "out"
    args = [
        f"source={root}",
        "corpus=librispeech",
        f"out={out}",
        "workers=1",
        "shard_size=2",
        "progress=false",
    ]
    manifest = prepare.main(args)
    names = [s["name"] for s in manifest["shards"]]
    for shard in manifest["shards"]:  # recorded from the bytes on disk, in the manifest and the stats files
        assert shard["sha256"] == file_sha256(out / shard["name"])
        assert shard["size_bytes"] == (out / shard["name"]).stat().st_size
        stats = json.loads((out / shard["name"].replace(".tar", ".stats.json")).read_text())
        assert (stats["sha256"], stats["size_bytes"]) == (shard["sha256"], shard["size_bytes"])
    good = (out / names[1]).read_bytes()
    manifest_bytes = (out / "manifest.json").read_bytes()

    results = prepare.main(["verify", str(out)])
    assert [r["ok"] for r in results] == [True]
    assert (
        capsys.readouterr().out
        == f"{out}: ok, 4 shards, 6 samples, {manifest['hours']:.2f} h (4 of 4 by sha256)\n"
    )

    (out / names[1]).write_bytes(good[: len(good) // 2])  # a cut copy of a finished shard
    with pytest.raises(SystemExit) as info:
        prepare.main(["verify", str(out)])
    assert info.value.code == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{out}: DAMAGED, 1 of 4 shards (4 of 4 by sha256)",
        f"  {names[1]}: size: {len(good) // 2} bytes, {len(good)} recorded",
        "re-run the prepare command that built a damaged split: it rebuilds the damaged shards only",
    ]

    caplog.set_level(logging.INFO, logger="aero_lightning.data.prepare")
    assert prepare.main(args) == manifest
    assert (
        f"{names[1]} is damaged (size: {len(good) // 2} bytes, {len(good)} recorded); rebuilding it"
        in caplog.text
    )
    assert "4 already finished (skipped), 1 to build" in caplog.text
    assert (out / names[1]).read_bytes() == good
    assert (out / "manifest.json").read_bytes() == manifest_bytes

    # same bytes, another hash: a changed shard is damaged too
    (out / names[2]).write_bytes(b"\0" * (out / names[2]).stat().st_size)
    with pytest.raises(SystemExit):
        prepare.main(["verify", str(out.parent)])  # the parent: every split folder below it
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{out}: DAMAGED, 1 of 4 shards (4 of 4 by sha256)"
    assert lines[1].startswith(f"  {names[2]}: sha256: ") and lines[1].endswith("... recorded")


@needs_espeak
def test_shards_prepared_before_hashes_were_recorded_are_counted_then_hashed(
    librispeech_dir, tmp_path, caplog
):
    root, _ = librispeech_dir
    out = tmp_path / "out"
    common = dict(source=root, workers=1, shard_size=2, progress=False)
    manifest = prepare.prepare_corpus("librispeech", out, **common)
    names = [s["name"] for s in manifest["shards"]]
    good = (out / names[0]).read_bytes()
    for stats_file in out.glob("*.stats.json"):  # as an earlier version wrote them
        stats = json.loads(stats_file.read_text())
        stats.pop("sha256"), stats.pop("size_bytes")
        stats_file.write_text(json.dumps(stats))
    old = json.loads((out / "manifest.json").read_text())
    for shard in old["shards"]:
        shard.pop("sha256"), shard.pop("size_bytes")
    (out / "manifest.json").write_text(json.dumps(old))
    (out / names[0]).write_bytes(good[: len(good) // 2])  # cut inside a member

    result = verify_split(out)
    assert result["hashed"] == 0 and [d["name"] for d in result["damaged"]] == [names[0]]
    assert result["damaged"][0]["reason"].startswith("truncated: ")
    caplog.set_level(logging.INFO, logger="aero_lightning.data.prepare")
    assert prepare.prepare_corpus("librispeech", out, **common) == manifest  # hashes recorded again
    assert "4 already finished (skipped), 1 to build" in caplog.text  # the 5th chunk: all rejected, no tar
    assert (out / names[0]).read_bytes() == good
    assert verify_split(out)["hashed"] == 4


def test_check_shard_counts_samples_without_a_hash(tmp_path):
    from aero_lightning.data.shards import ShardWriter, asr_sample_json, check_shard, encode_flac

    with ShardWriter(tmp_path, "c-test", 10) as writer:
        for i in range(3):
            record = asr_sample_json(corpus="c", text=f"t{i}", duration_s=0.1, source="s")
            writer.write(f"k{i}", encode_flac(np.zeros(1600, dtype=np.float32)), record)
    shard = tmp_path / "c-test-000000.tar"
    (entry,) = writer.shards
    assert check_shard(shard, 3, entry["size_bytes"], entry["sha256"]) is None
    assert check_shard(shard, 3) is None
    assert check_shard(shard, 4) == "sample count: 3 samples, 4 recorded"
    assert check_shard(tmp_path / "gone.tar", 3) == "missing: the shard file does not exist"
