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
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from aero_lightning.data.features import SAMPLE_RATE_HZ

__all__ = ["AUDIO_EXTENSIONS", "AudioReadError", "find_audio_files", "load_audio", "to_mono_16k"]


def _extensions() -> tuple[str, ...]:
    names = {f".{fmt.lower()}" for fmt in sf.available_formats()}
    names |= {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
    names -= {".raw"}  # header-less: needs the rate and format from the caller
    return tuple(sorted(names))


AUDIO_EXTENSIONS: tuple[str, ...] = _extensions()
"""File suffixes (lower case) collected when a folder or glob is given: what this libsndfile reads, plus MP3/Opus."""


class AudioReadError(RuntimeError):
    """An audio file could not be read or holds no samples."""


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
        AudioReadError: if the file is missing, libsndfile cannot decode it, or it holds no samples; the message
            names the file and libsndfile's reason.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        wave, rate = sf.read(handle, dtype="float32", always_2d=True)  # (T, C)
    except FileNotFoundError as err:
        raise AudioReadError(f"{name}: no such file") from err
    except Exception as err:  # noqa: BLE001 - libsndfile raises LibsndfileError, RuntimeError, TypeError, ...
        raise AudioReadError(f"{name}: not readable as audio ({type(err).__name__}: {err})") from err
    if wave.shape[0] == 0:
        raise AudioReadError(f"{name}: the file holds no audio samples")
    return to_mono_16k(wave, int(rate))


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
        raise FileNotFoundError(
            f"no audio file found for {[str(i) for i in items]}: give a file, a folder (searched recursively for "
            f"{', '.join(AUDIO_EXTENSIONS)}) or a glob pattern"
        )
    return [found[k] for k in sorted(found)]
