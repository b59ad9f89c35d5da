"""audio_io: why a file cannot be read (missing, empty, truncated, unreadable), from the header and from decoding."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from aero_lightning.data.audio_io import (
    READ_FAILURE_REASONS,
    AudioReadError,
    audio_duration_s,
    find_audio_files,
    load_audio,
)
from aero_lightning.data.rejects import REJECT_REASONS
from aero_lightning.errors import UserError


@pytest.fixture
def wav(tmp_path):
    """A 1 s 16-bit WAV (16 000 frames) and its bytes."""
    path = tmp_path / "full.wav"
    sf.write(path, 0.5 * np.sin(np.arange(16000) / 10).astype(np.float32), 16000, subtype="PCM_16")
    return path, path.read_bytes()


def _reason(fn, source) -> tuple[str, str]:
    with pytest.raises(AudioReadError) as info:
        fn(source)
    return info.value.reason, str(info.value)


def test_a_wav_cut_in_the_middle_of_its_data_is_truncated_not_shorter(wav, tmp_path):
    path, data = wav
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: 44 + 2 * 8000])  # header + 8000 of the 16 000 frames
    assert sf.info(str(cut)).frames == 8000  # libsndfile alone reports a complete, shorter file
    reason, message = _reason(load_audio, cut)
    assert reason == "truncated_file"
    assert (
        message
        == f"{cut}: the audio data stops after 8000 of the 16000 frames its header gives (0.50 of 1.00 s)"
    )
    assert _reason(audio_duration_s, cut)[0] == "truncated_file"
    assert _reason(load_audio, data[: 44 + 2 * 8000]) == (
        "truncated_file",
        "<bytes>: the audio data stops after 8000 of the 16000 frames its header gives (0.50 of 1.00 s)",
    )
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(data[:44])
    assert _reason(load_audio, header_only) == (
        "truncated_file",
        f"{header_only}: the header gives 16000 frames but no audio data follows",
    )


def test_an_empty_file_is_empty_not_an_unknown_format(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert _reason(load_audio, empty) == ("empty_file", f"{empty}: the file is empty (0 bytes)")
    assert _reason(audio_duration_s, empty) == ("empty_file", f"{empty}: the file is empty (0 bytes)")
    no_samples = tmp_path / "no_samples.wav"
    sf.write(no_samples, np.zeros(0, dtype=np.float32), 16000)
    assert _reason(load_audio, no_samples) == ("empty_file", f"{no_samples}: the file holds no audio samples")
    assert _reason(audio_duration_s, no_samples)[0] == "empty_file"


def test_missing_and_undecodable_files(wav, tmp_path):
    assert _reason(load_audio, tmp_path / "nope.wav") == (
        "missing_file",
        f"{tmp_path / 'nope.wav'}: no such file",
    )
    assert _reason(audio_duration_s, tmp_path / "nope.wav")[0] == "missing_file"
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    reason, message = _reason(load_audio, junk)
    assert reason == "unreadable_audio" and message.startswith(f"{junk}: not readable as audio (")
    assert " at 0x" not in message


def test_complete_files_of_every_container_read_in_full(wav, tmp_path):
    path, _ = wav
    wave = 0.3 * np.sin(np.arange(24000) / 7).astype(np.float32)
    for name, kwargs in {
        "a.flac": {},
        "a.ogg": {"format": "OGG", "subtype": "VORBIS"},
        "a.mp3": {"format": "MP3"},
        "a.aiff": {"format": "AIFF"},
        "a_float.wav": {"subtype": "FLOAT"},
    }.items():
        sf.write(tmp_path / name, wave, 16000, **kwargs)
        assert load_audio(tmp_path / name).shape == (24000,), name
        assert audio_duration_s(tmp_path / name) == 1.5, name
    assert load_audio(path).shape == (16000,) and audio_duration_s(path) == 1.0


def test_every_read_failure_reason_is_a_reject_reason(tmp_path):
    assert set(READ_FAILURE_REASONS) <= set(REJECT_REASONS)
    with pytest.raises(UserError, match="no audio file found"):
        find_audio_files(tmp_path / "*.wav")
