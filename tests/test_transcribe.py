"""transcribe.py: formats, rates, channels, an unreadable file, long-form in one LLM context."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from helpers.aero_runs import SENTENCES, speak, write_lightning_run

from aero_lightning.data.audio_io import AudioReadError, find_audio_files, load_audio
from aero_lightning.eval.decode import GenerationOptions, plan_decode_batches
from aero_lightning.tasks.transcribe import transcribe_files

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["a.wav", "b.flac", "c.ogg", "d.mp3", "e_8k_stereo.wav"]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    sf.write(folder / "a.wav", speak(SENTENCES[0]), 16000)
    sf.write(folder / "b.flac", speak(SENTENCES[1], 1), 16000)
    sf.write(folder / "c.ogg", speak(SENTENCES[2], 2), 16000, format="OGG", subtype="VORBIS")
    sf.write(folder / "d.mp3", speak(SENTENCES[3], 3), 16000, format="MP3")
    wave_8k = soxr.resample(speak(SENTENCES[4], 4), 16000, 8000)
    sf.write(folder / "e_8k_stereo.wav", np.stack([wave_8k, 0.5 * wave_8k], axis=1), 8000)  # (T, 2)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    (folder / "notes.txt").write_text("not audio, and not collected from a folder")
    return folder


@pytest.fixture(scope="module")
def run_ckpt(tiny_dir, tmp_path_factory) -> Path:
    return write_lightning_run(tmp_path_factory.mktemp("run"), tiny_dir)


def test_find_audio_files_folder_glob_and_list(audio_dir):
    files = find_audio_files(audio_dir)
    assert [f.name for f in files] == sorted([*GOOD, "broken.wav", "empty.wav"])
    assert [f.name for f in find_audio_files(str(audio_dir / "*.wav"))] == ["a.wav", "broken.wav", "e_8k_stereo.wav", "empty.wav"]  # fmt: skip
    named = find_audio_files([audio_dir / "notes.txt", audio_dir / "a.wav"])  # named files are kept as given
    assert [f.name for f in named] == ["a.wav", "notes.txt"]
    with pytest.raises(FileNotFoundError, match="no audio file"):
        find_audio_files(audio_dir / "*.flacx")


def test_load_audio_downmixes_and_resamples(audio_dir):
    wave = load_audio(audio_dir / "e_8k_stereo.wav")
    raw, rate = sf.read(audio_dir / "e_8k_stereo.wav", dtype="float32", always_2d=True)
    assert rate == 8000 and raw.shape[1] == 2
    expected = soxr.resample(raw.mean(axis=1), 8000, 16000)
    assert wave.dtype == np.float32 and wave.shape == expected.shape == (2 * raw.shape[0],)
    np.testing.assert_allclose(wave, expected, atol=1e-6)
    with pytest.raises(AudioReadError, match="broken.wav: not readable as audio"):
        load_audio(audio_dir / "broken.wav")


def test_every_format_is_transcribed_and_an_unreadable_file_is_reported(model, audio_dir, caplog):
    model.eval()
    files = find_audio_files(audio_dir)
    with caplog.at_level(logging.ERROR, logger="aero_lightning.tasks.transcribe"):
        out = transcribe_files(
            model, files, options=GenerationOptions(max_new_tokens=4), batch_size=3, progress=False
        )
    by_name = {Path(r["path"]).name: r for r in out["records"]}
    assert (out["files"], out["transcribed"], out["failed"]) == (7, 5, 2)
    for name in GOOD:
        assert isinstance(by_name[name]["text"], str) and 1 <= by_name[name]["num_new_tokens"] <= 4
    assert "not readable as audio" in by_name["broken.wav"]["error"]
    assert "holds no audio samples" in by_name["empty.wav"]["error"]
    assert "broken.wav" in caplog.text and "2 of 7 file(s) could not be read" in caplog.text
    # the 8 kHz stereo file is resampled, not played at the wrong speed
    assert by_name["e_8k_stereo.wav"]["duration_s"] == pytest.approx(
        len(speak(SENTENCES[4], 4)) / 16000, abs=0.01
    )
    assert out["rtfx"] > 0


def test_batching_does_not_change_the_text(model, audio_dir):
    model.eval()
    files = [audio_dir / n for n in GOOD]
    # scaled budgets that differ between the files
    options = GenerationOptions(max_new_tokens=None, base_new_tokens=2, chars_per_second=4.0)
    one = transcribe_files(model, files, options=options, batch_size=1, progress=False)
    many = transcribe_files(model, files, options=options, batch_size=5, progress=False)
    assert [r["text"] for r in one["records"]] == [r["text"] for r in many["records"]]
    assert len({r["num_new_tokens"] for r in one["records"]}) > 1  # each sample is cut at its own budget


def test_plan_decode_batches():
    durations = [1.0, 30.0, 2.0, 600.0, 3.0]
    assert plan_decode_batches(durations, batch_size=2) == [[3, 1], [4, 2], [0]]
    assert plan_decode_batches(durations, batch_size=8, max_batch_audio_s=100.0) == [[3], [1, 4, 2], [0]]


def _long_wave(seconds: float) -> np.ndarray:
    """``seconds`` of espeak speech: the demo sentences, repeated."""
    clip = np.concatenate([speak(s, i) for i, s in enumerate(SENTENCES)])
    reps = int(np.ceil(seconds * 16000 / len(clip)))
    return np.tile(clip, reps)[: int(seconds * 16000)]


def test_two_minutes_go_through_one_llm_context(model, tmp_path):
    model.eval()
    path = tmp_path / "two_minutes.flac"
    sf.write(path, _long_wave(120.0), 16000)
    calls = []
    generate = model.generate

    def spy(input_ids, *args, **kwargs):
        calls.append(input_ids)
        return generate(input_ids, *args, **kwargs)

    model.generate = spy
    out = transcribe_files(model, [path], options=GenerationOptions(max_new_tokens=8), progress=False)
    assert out["transcribed"] == 1 and out["records"][0]["duration_s"] == pytest.approx(120.0)
    assert len(calls) == 1  # one generate call: no chunking
    slots = int((calls[0] == model.audio_token_id).sum())
    # 4 windows x 375 tokens, all in one context
    assert slots == model.audio_token_counter()(120 * 16000) == 4 * 375


def _run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "transcribe.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_transcribes_a_folder(run_ckpt, audio_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _run_cli(
        f"ckpt={run_ckpt}",
        f"audio={audio_dir}",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "generation.max_new_tokens=4",
        "progress=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7 and sum("text" in r for r in records) == 5
    printed = [line for line in proc.stdout.splitlines() if "\t" in line]
    assert len(printed) == 5
    assert "broken.wav: not readable as audio" in proc.stdout + proc.stderr  # Hydra logs to stdout


def test_cli_fails_when_nothing_is_readable(run_ckpt, audio_dir, tmp_path):
    proc = _run_cli(f"ckpt={run_ckpt}", f"audio={audio_dir / 'broken.wav'}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "could not be read" in proc.stdout + proc.stderr


def test_cli_fifteen_minutes_in_one_pass(run_ckpt, tmp_path):
    """A 15-minute recording: 30 encoder windows and 11 250 audio tokens in one LLM context, with the demo
    architecture (experiment=demo: 12.5 audio tokens per second)."""
    path = tmp_path / "fifteen_minutes.flac"
    sf.write(path, _long_wave(900.0), 16000)
    out = tmp_path / "out.jsonl"
    start = time.perf_counter()
    proc = _run_cli(
        f"ckpt={run_ckpt}",
        f"audio={path}",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "generation.max_new_tokens=16",
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["duration_s"] == pytest.approx(900.0) and record["num_new_tokens"] <= 16
    assert elapsed < 120, f"15 minutes took {elapsed:.0f} s"
