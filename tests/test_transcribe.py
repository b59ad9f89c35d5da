"""transcribe.py: formats, rates, channels, unreadable and missing inputs with their reasons and exit status,
long-form in one LLM context up to what a pass holds and in chunks beyond, progress lines."""

from __future__ import annotations

import functools
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
from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.eval.chunking import plan_chunks
from aero_lightning.eval.decode import (
    GenerationOptions,
    chars_per_token,
    pass_limit_samples,
    plan_decode_batches,
)
from aero_lightning.model.build import load_model
from aero_lightning.progress import Progress
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
    assert (by_name["broken.wav"]["reason"], by_name["empty.wav"]["reason"]) == (
        "unreadable_audio",
        "empty_file",
    )
    assert out["failed_by_reason"] == {"empty_file": 1, "unreadable_audio": 1}
    assert "2 of 7 input(s) could not be transcribed" in caplog.text
    assert f"{audio_dir / 'broken.wav'} (unreadable_audio)" in caplog.text
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
    assert proc.returncode == 3, proc.stderr[-3000:]  # two of the seven files cannot be read
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7 and sum("text" in r for r in records) == 5
    assert {Path(r["path"]).name: r["reason"] for r in records if "reason" in r} == {
        "broken.wav": "unreadable_audio",
        "empty.wav": "empty_file",
    }
    printed = proc.stdout.splitlines()
    assert len(printed) == 7 and sum(line.startswith("#failed\t") for line in printed) == 2
    assert "broken.wav: not readable as audio" in proc.stderr


def test_cli_fails_when_nothing_is_readable(run_ckpt, audio_dir, tmp_path):
    proc = _run_cli(f"ckpt={run_ckpt}", f"audio={audio_dir / 'broken.wav'}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    assert "1 of 1 input(s) could not be transcribed" in proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith(f"#failed\t{audio_dir / 'broken.wav'}\tunreadable_audio\t")


def test_cli_lists_a_missing_file_and_exits_3(run_ckpt, audio_dir, tmp_path):
    """A list naming a file that does not exist: the other file is transcribed, the missing one is listed with its
    reason in the output file and on stdout, and the exit status says that some inputs failed."""
    good, missing = audio_dir / "a.wav", tmp_path / "no_such.wav"
    out = tmp_path / "out.txt"
    proc = _run_cli(
        f"ckpt={run_ckpt}",
        f"audio=[{good},{missing}]",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "generation.max_new_tokens=4",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{good}\t")
    assert (
        lines[1] == f"#failed\t{missing}\tmissing_file\t{missing}: no such file, folder or matching pattern"
    )
    assert proc.stdout.splitlines() == lines  # stdout carries the same lines
    assert "1 input(s) match no file" in proc.stderr and "(failed: missing_file 1)" in proc.stderr
    assert "exit status 3" in proc.stderr
    # not a terminal: progress is logged as lines with a total
    assert "transcribing: 2/2 (100 %)" in proc.stderr


def test_progress_lines_have_totals_for_files_and_for_the_tokens_of_a_long_file(model, tmp_path, monkeypatch):
    model.eval()
    lines: list[str] = []
    logged = functools.partial(Progress, interval_s=0, terminal=False, log=lines.append, clock=lambda: 0.0)
    monkeypatch.setattr("aero_lightning.eval.decode.Progress", logged)
    monkeypatch.setattr("aero_lightning.tasks.transcribe.Progress", logged)
    path = tmp_path / "seventy.flac"
    sf.write(path, _long_wave(70.0), 16000)
    out = transcribe_files(model, [path, tmp_path / "gone.wav"], options=GenerationOptions(max_new_tokens=8))
    assert (out["transcribed"], out["failed_by_reason"]) == (1, {"missing_file": 1})
    assert (
        lines[0] == "transcribing: 1/2 (50 %), 0.0 file/s, elapsed 0s, ETA ?"
    )  # the missing file, counted first
    tokens = [line for line in lines if line.startswith("seventy.flac: ")]
    assert tokens[0] == "seventy.flac: 1/8 (12 %), 0.0 token/s, elapsed 0s, ETA ?"
    assert tokens[-1] == "seventy.flac: 8/8 (100 %), 0.0 token/s, elapsed 0s, ETA ? (done)"
    assert lines[-1].startswith("transcribing: 2/2 (100 %), 0.0 file/s, elapsed 0s, ETA ?, RTFx ")
    assert lines[-1].endswith(" (done)")


def test_cli_fifteen_minutes_in_chunks(run_ckpt, tmp_path):
    """A 15-minute recording with the demo architecture (experiment=demo: 12.5 audio tokens per second, an LLM of
    4096 positions): longer than one pass holds, so it is decoded in overlapping chunks at the pass limit."""
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
    model = load_model(run_ckpt, device="cpu")
    options = GenerationOptions(max_new_tokens=16)
    limit = pass_limit_samples(model, DEFAULT_ASR_PROMPT, options, chars_per_token(model.tokenizer))
    chunks = plan_chunks(900 * 16000, limit, 5 * 16000)
    assert 200 * 16000 < limit < 900 * 16000 and len(chunks) == 3
    assert record["duration_s"] == pytest.approx(900.0) and record["num_chunks"] == 3
    assert record["num_new_tokens"] <= 3 * 16
    assert "fifteen_minutes.flac: 48/48 (100 %)" in proc.stderr  # progress in tokens inside the long file
    assert elapsed < 120, f"15 minutes took {elapsed:.0f} s"


def test_help_documents_the_exit_status_and_the_long_audio_options(tmp_path):
    proc = _run_cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert (
        "Exit status: 0 every input transcribed; 1 none transcribed; 2 a usage error (bad arguments, missing "
        "checkpoint, no input found at all); 3 some inputs transcribed and some failed." in text
    )
    for option in ("repetition_guard.enabled", "max_pass_s", "chunk_s", "stride_s"):
        assert f"generation.{option}=" in proc.stdout
