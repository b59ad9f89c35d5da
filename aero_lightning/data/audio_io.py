"""Reading audio files for inference: any format libsndfile reads, any rate and channel count -> 16 kHz mono.

libsndfile (through ``soundfile``) reads WAV, FLAC, OGG/Vorbis, Opus, MP3 (libsndfile >= 1.1), AIFF, AU, CAF,
W64 and more; ``soundfile.available_formats()`` lists what the installed library reads. Multi-channel audio is
averaged to mono and resampled to 16 kHz with soxr (the resampler :mod:`aero_lightning.data.prepare` uses for the
training shards), so a file is transcribed exactly as it would have been prepared for training.
"""

from __future__ import annotations

import glob
import io
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.errors import UserFileNotFoundError

__all__ = [
    "AUDIO_EXTENSIONS",
    "READ_FAILURE_REASONS",
    "AudioReadError",
    "audio_duration_s",
    "find_audio_files",
    "load_audio",
    "to_mono_16k",
]


def _extensions() -> tuple[str, ...]:
    names = {f".{fmt.lower()}" for fmt in sf.available_formats()}
    names |= {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
    names -= {".raw"}  # header-less: needs the rate and format from the caller
    return tuple(sorted(names))


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

AUDIO_EXTENSIONS: tuple[str, ...] = _extensions()
"""File suffixes (lower case) collected when a folder or glob is given: what this libsndfile reads, plus MP3/Opus."""


class AudioReadError(RuntimeError):
    """An audio file could not be read or holds no samples.

    Args:
        message: what went wrong, naming the file.
        reason: the category (:data:`READ_FAILURE_REASONS`); ``unreadable_audio`` when not given.

    Attributes:
        reason: the category, for records and counters that list failed inputs by reason.
    """

    def __init__(self, message: str, reason: str = "unreadable_audio"):
        super().__init__(message)
        self.reason = reason


READ_FAILURE_REASONS: dict[str, str] = {
    "missing_file": "the file does not exist",
    "empty_file": "the file is empty (0 bytes) or its header gives no audio samples",
    "truncated_file": "the audio data stops before the length the file's header gives (a cut-off download or copy)",
    "unreadable_audio": "libsndfile cannot decode the file",
}
"""The :attr:`AudioReadError.reason` values and what each means."""

_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)
"""``data`` chunk sizes that streaming writers (ffmpeg to a pipe, sox) leave when the length is not known."""


def _wav_header_frames(handle: BinaryIO, size: int) -> int | None:
    """Frames a RIFF/WAVE header declares for its ``data`` chunk, or None (not a plain WAV, or length unknown).

    libsndfile shortens a WAV whose ``data`` chunk runs past the end of the file to the frames present and reports
    that as ``frames`` (``soundfile.info``), so a cut-off file reads as a complete shorter one; the declared size is
    only in the header.

    Args:
        handle: the file, positioned anywhere (it is rewound).
        size: the file's length in bytes.
    """
    handle.seek(0)
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None  # RF64, W64 and other formats keep libsndfile's own frame count
    block_align = None
    offset = 12
    while offset + 8 <= size:
        handle.seek(offset)
        chunk = handle.read(8)
        if len(chunk) < 8:
            return None
        name, length = chunk[:4], struct.unpack("<I", chunk[4:8])[0]
        if name == b"fmt ":
            fmt = handle.read(min(length, 16))
            if len(fmt) >= 14:
                block_align = struct.unpack("<H", fmt[12:14])[0]
        elif name == b"data":
            if length in _WAV_UNKNOWN_SIZES or not block_align:
                return None
            return length // block_align
        offset += 8 + length + (length & 1)  # chunks are padded to an even length
    return None


def to_mono_16k(waveform: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """Downmix and resample a waveform to 16 kHz mono float32.

    Args:
        waveform: ``(T,)`` or ``(T, C)`` samples (soundfile's layout), any float or int dtype.
        sample_rate_hz: its sample rate in Hz.

    Returns:
        ``(T',)`` float32 at 16 kHz, ``T' = round(T * 16000 / sample_rate_hz)`` (soxr, high quality).

    Raises:
        ValueError: for a non-positive sample rate or an array of more than two dimensions.
    """
    if sample_rate_hz <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate_hz}")
    wave = np.asarray(waveform)
    if wave.ndim == 2:
        wave = wave.mean(axis=1, dtype=np.float32)  # (T, C) -> (T,)
    elif wave.ndim != 1:
        raise ValueError(f"expected a (T,) or (T, C) waveform, got shape {wave.shape}")
    wave = wave.astype(np.float32, copy=False)
    if sample_rate_hz != SAMPLE_RATE_HZ and wave.size:
        wave = soxr.resample(wave, sample_rate_hz, SAMPLE_RATE_HZ).astype(np.float32, copy=False)
    return np.ascontiguousarray(wave)


def load_audio(source: str | os.PathLike | bytes) -> np.ndarray:
    """Read an audio file (path or bytes) as 16 kHz mono float32.

    Args:
        source: a file path, or the file's bytes.

    Returns:
        ``(T,)`` float32 waveform at 16 kHz, values in [-1, 1] for PCM input.

    Raises:
        AudioReadError: if the file is missing (``missing_file``), empty (``empty_file``: 0 bytes, or no samples),
            shorter than its header says (``truncated_file``: a WAV whose data stops early, or any format that
            decodes fewer frames than its header gives), or not decodable (``unreadable_audio``); the message
            names the file and the cause.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        handle: BinaryIO = io.BytesIO(source)
        size = len(source)
    else:
        try:
            handle = open(source, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as err:
            raise AudioReadError(f"{name}: no such file", "missing_file") from err
        except OSError as err:
            raise AudioReadError(f"{name}: cannot be opened ({err})") from err
        size = os.fstat(handle.fileno()).st_size
    with handle:
        if size == 0:
            raise AudioReadError(f"{name}: the file is empty (0 bytes)", "empty_file")
        declared = _wav_header_frames(handle, size)
        handle.seek(0)
        try:
            with sf.SoundFile(handle) as f:
                # an MP3's frame count is an estimate when it has no Xing/Info header (VBR): not a promise
                header_frames = 0 if f.format == "MP3" else f.frames
                wave = f.read(dtype="float32", always_2d=True)  # (T, C)
                rate = f.samplerate
        except Exception as err:  # noqa: BLE001 - libsndfile raises LibsndfileError, RuntimeError, TypeError, ...
            message = _OBJECT_REPR.sub("<audio>", str(err))  # libsndfile names a file object by its address
            raise AudioReadError(f"{name}: not readable as audio ({type(err).__name__}: {message})") from err
    expected = max(header_frames, declared or 0)
    if wave.shape[0] == 0:
        if expected > 0:
            raise AudioReadError(
                f"{name}: the header gives {expected} frames but no audio data follows", "truncated_file"
            )
        raise AudioReadError(f"{name}: the file holds no audio samples", "empty_file")
    if wave.shape[0] < expected:
        raise AudioReadError(
            f"{name}: the audio data stops after {wave.shape[0]} of the {expected} frames its header gives "
            f"({wave.shape[0] / rate:.2f} of {expected / rate:.2f} s)",
            "truncated_file",
        )
    return to_mono_16k(wave, int(rate))


def audio_duration_s(path: str | os.PathLike) -> float:
    """Duration of an audio file from its header, without decoding it.

    Args:
        path: the file.

    Returns:
        Seconds of audio: the frames libsndfile finds, or fewer than a WAV header declares (the file is then
        rejected as truncated).

    Raises:
        AudioReadError: with the reasons of :func:`load_audio` (``missing_file``, ``empty_file``,
            ``truncated_file`` for a WAV whose header declares more data than the file holds, ``unreadable_audio``).
    """
    name = str(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as err:
        raise AudioReadError(f"{name}: no such file", "missing_file") from err
    if size == 0:
        raise AudioReadError(f"{name}: the file is empty (0 bytes)", "empty_file")
    try:
        info = sf.info(name)
    except Exception as err:  # noqa: BLE001 - libsndfile raises several types
        raise AudioReadError(f"{name}: not readable as audio ({type(err).__name__}: {err})") from err
    with open(path, "rb") as handle:
        declared = _wav_header_frames(handle, size)
    if declared is not None and info.frames < declared:
        raise AudioReadError(
            f"{name}: the audio data stops after {info.frames} of the {declared} frames its header gives",
            "truncated_file",
        )
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioReadError(f"{name}: the file holds no audio samples", "empty_file")
    return info.frames / info.samplerate


def find_audio_files(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand a file, a folder (recursively) or a glob pattern into a sorted list of files.

    A folder or a glob keeps only files with a suffix in :data:`AUDIO_EXTENSIONS`; a file named directly is kept
    whatever its suffix (so an unreadable one is reported, not silently skipped). A list is expanded item by item,
    duplicates removed.

    Args:
        spec: a path, a glob (``"data/**/*.wav"``), or a list of them.

    Returns:
        Paths in sorted order.

    Raises:
        FileNotFoundError: if nothing matches (the message says what was looked for).
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: dict[str, Path] = {}
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_file():
            found[str(path)] = path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
                    found[str(p)] = p
        else:
            for match in sorted(glob.glob(os.path.expanduser(text), recursive=True)):
                p = Path(match)
                if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
                    found[str(p)] = p
    if not found:
        raise UserFileNotFoundError(
            f"no audio file found for {[str(i) for i in items]}: give a file, a folder (searched recursively for "
            f"{', '.join(AUDIO_EXTENSIONS)}) or a glob pattern"
        )
    return [found[k] for k in sorted(found)]
