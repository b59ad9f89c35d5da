"""WebDataset shard writing, audio encoding and corpus manifests.

Every prepared corpus split lives in one folder::

    <folder>/<prefix>-000000.tar, <prefix>-000001.tar, ...   # WebDataset shards
    <folder>/manifest.json                                  # counts, hours, histogram, rejects

Each sample in a shard is two tar members sharing a key: ``<key>.flac`` (16 kHz mono, FLAC PCM_16, lossless)
and ``<key>.json`` (UTF-8 JSON with sorted keys, see :func:`asr_sample_json`). Any tar tool and plain
``webdataset.WebDataset(urls)`` can read them.

Shards are byte-for-byte deterministic: tar headers carry ``mtime=0``, ``uid=gid=0``, empty user/group names
and mode ``0o644``, and members are written in insertion order. Each shard is first written to
``<name>.tmp`` and moved into place with :func:`os.replace`, so a crash never leaves a truncated ``.tar``; its size
and SHA-256 are recorded (:attr:`ShardWriter.shards`), so later damage (a cut copy, a disk error) can be found.

Manifest schema (``manifest.json``, written with sorted keys):

- ``corpus`` (str), ``split`` (str), ``sample_rate`` (int, Hz; always 16000)
- ``shards``: list of ``{"name": str, "num_samples": int, "duration_s": float, "size_bytes": int, "sha256": str}``
  in shard order (``size_bytes`` and ``sha256``, hex, of the finished tar file; absent in manifests written before
  they were recorded); :func:`verify_split` checks a split against them
- ``num_samples`` (int), ``duration_s`` (float, total seconds), ``hours`` (float)
- ``duration_histogram``: ``{"edges_s": [0, 1, 2, 5, ..., 900, null], "counts": [...]}``; bin ``i`` counts
  samples with ``edges_s[i] <= duration_s < edges_s[i + 1]``; the last edge is ``null`` meaning +infinity
  (JSON has no infinity), so ``len(counts) == len(edges_s) - 1``.
- ``rejected``: list of ``{"key": str, "reason": str, "detail": str}``; ``reason`` is a short category
  (e.g. ``"synthesis_failed"``, ``"empty_audio"``), ``detail`` the human-readable message.
- ``rejected_counts``: ``{reason: count}``
- any extra fields the producer adds (e.g. ``build_params``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT, asr_messages
from aero_lightning.errors import UserFileNotFoundError

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
"""Sample rate of every waveform stored in our shards, in Hz."""

MANIFEST_NAME = "manifest.json"

DURATION_EDGES_S: tuple[float, ...] = (0, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, math.inf)
"""Duration histogram bin edges in seconds; the last bin is open-ended (written as ``null``)."""


# --------------------------------------------------------------------------------------------- audio


def encode_flac(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE_HZ) -> bytes:
    """Encode a mono waveform as FLAC (16-bit PCM).

    Args:
        waveform: ``(T,)`` float array with values in [-1, 1]; values outside are clipped.
        sample_rate: sample rate of ``waveform`` in Hz.

    Returns:
        The FLAC file as bytes (deterministic for identical input).

    Raises:
        ValueError: if ``waveform`` is not one-dimensional or is empty.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"encode_flac expects a mono (T,) waveform, got shape {waveform.shape}")
    if waveform.size == 0:
        raise ValueError("encode_flac got an empty waveform")
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(waveform, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an audio file held in memory (FLAC, WAV, OGG, ... anything libsndfile reads).

    Multi-channel audio is averaged down to mono.

    Args:
        data: the encoded file's bytes.

    Returns:
        ``(waveform, sample_rate)``: ``(T,)`` float32 waveform in [-1, 1] and its sample rate in Hz.

    Raises:
        soundfile.LibsndfileError: if the bytes are not a readable audio file.
    """
    waveform, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, C)
    return waveform.mean(axis=1, dtype=np.float32), int(sample_rate)  # (T,)


# ------------------------------------------------------------------------------------- sample json


def asr_sample_json(
    *,
    corpus: str,
    text: str,
    duration_s: float,
    source: str,
    language: str = "en",
    prompt: str = DEFAULT_ASR_PROMPT,
    **extra: Any,
) -> dict[str, Any]:
    """Build the JSON record of one ASR sample, the ``<key>.json`` member every shard sample carries.

    Args:
        corpus: corpus name, e.g. ``"demo_espeak"``.
        text: exact transcript; also the assistant message's text.
        duration_s: audio duration in seconds.
        source: where the audio came from (file path, dataset id, synthesis settings, ...).
        language: ISO 639-1 language code of the speech.
        prompt: user instruction of the chat messages.
        **extra: additional corpus-specific fields; must not collide with the standard ones.

    Returns:
        ``{"corpus", "task": "asr", "duration_s", "messages", "text", "language", "source", **extra}``.

    Raises:
        ValueError: if an ``extra`` key collides with a standard field.
    """
    record: dict[str, Any] = {
        "corpus": corpus,
        "task": "asr",
        "duration_s": float(duration_s),
        "messages": asr_messages(text, prompt),
        "text": text,
        "language": language,
        "source": source,
    }
    clash = sorted(set(extra) & set(record))
    if clash:
        raise ValueError(f"extra sample fields collide with standard fields: {clash}")
    record.update(extra)
    return record


# ------------------------------------------------------------------------------------------- writer


def _tar_add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write samples into deterministic WebDataset tar shards ``<prefix>-%06d.tar``.

    Use as a context manager; on a clean exit the last shard is finalised, on an exception the unfinished
    shard's ``.tmp`` file is removed (already finished shards stay). Shard bookkeeping is available from
    :attr:`shards` (per shard: name, sample count, audio seconds, size in bytes and SHA-256 of the file) and
    :attr:`durations_s` (per sample).

    Args:
        folder: output folder; created if missing.
        prefix: shard file name prefix.
        max_samples_per_shard: samples per shard before a new one is started (the last may hold fewer).

    Example::

        with ShardWriter(out, "demo_espeak-train", 1000) as writer:
            writer.write(key, encode_flac(wave), record)
        shards = writer.shards
    """

    def __init__(self, folder: str | os.PathLike, prefix: str, max_samples_per_shard: int = 1000) -> None:
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_samples_per_shard = int(max_samples_per_shard)
        self.shards: list[dict[str, Any]] = []
        self.durations_s: list[float] = []
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self._current: dict[str, Any] | None = None
        self._keys: set[str] = set()

    # context manager -------------------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    # public ----------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Number of samples written so far."""
        return len(self.durations_s)

    def write(
        self,
        key: str,
        audio: bytes | Sequence[bytes] | None,
        record: Mapping[str, Any],
        audio_ext: str = "flac",
    ) -> None:
        """Append one sample.

        Args:
            key: unique sample key; no ``.`` or ``/`` (WebDataset splits the key at the first dot).
            audio: encoded audio bytes (see :func:`encode_flac`) of the sample's one clip; a list of them for a
                conversation with several clips (members ``<key>.0.flac``, ``<key>.1.flac``, ...; the record then
                needs ``audio_durations_s``); None or ``[]`` for a text-only sample.
            record: the sample's JSON record; must contain ``duration_s`` (seconds of audio in all).
            audio_ext: extension of the audio members.

        Raises:
            ValueError: on a malformed or duplicate key, a record without ``duration_s``, or several clips without
                one ``audio_durations_s`` entry each.
        """
        if not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if "duration_s" not in record:
            raise ValueError(f"record of {key!r} has no 'duration_s'")
        clips = [] if audio is None else [audio] if isinstance(audio, (bytes, bytearray)) else list(audio)
        if len(clips) > 1 and len(record.get("audio_durations_s") or ()) != len(clips):
            raise ValueError(
                f"record of {key!r} needs audio_durations_s with one entry per clip ({len(clips)})"
            )
        if self._tar is None:
            self._open_next()
        assert self._tar is not None and self._current is not None
        payload = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
        if len(clips) == 1:
            _tar_add_bytes(self._tar, f"{key}.{audio_ext}", clips[0])
        for i, clip in enumerate(clips if len(clips) > 1 else []):
            _tar_add_bytes(self._tar, f"{key}.{i}.{audio_ext}", clip)
        _tar_add_bytes(self._tar, f"{key}.json", payload)
        self._keys.add(key)
        duration_s = float(record["duration_s"])
        self.durations_s.append(duration_s)
        self._current["num_samples"] += 1
        self._current["duration_s"] += duration_s
        if self._current["num_samples"] >= self.max_samples_per_shard:
            self._finish()

    def close(self) -> None:
        """Finalise the open shard (if any). Idempotent."""
        if self._tar is not None:
            self._finish()

    # internals -------------------------------------------------------------------------------------
    def _open_next(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = open(self.folder / f"{name}.tmp", "wb")  # noqa: SIM115 - closed in _finish/_abort
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._current = {"name": name, "num_samples": 0, "duration_s": 0.0}

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._current is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._current["name"]
        os.replace(self.folder / f"{name}.tmp", self.folder / name)
        self._current["duration_s"] = round(self._current["duration_s"], 6)
        self._current["size_bytes"] = (self.folder / name).stat().st_size
        self._current["sha256"] = file_sha256(self.folder / name)  # read back: the bytes on disk
        self.shards.append(self._current)
        self._tar = self._file = self._current = None

    def _abort(self) -> None:
        if self._file is not None and self._current is not None:
            self._file.close()
            (self.folder / f"{self._current['name']}.tmp").unlink(missing_ok=True)
        self._tar = self._file = self._current = None


# ----------------------------------------------------------------------------------------- manifest


def duration_histogram(
    durations_s: Iterable[float], edges_s: Sequence[float] = DURATION_EDGES_S
) -> dict[str, list]:
    """Histogram of sample durations.

    Args:
        durations_s: per-sample durations in seconds.
        edges_s: increasing bin edges in seconds; the last may be ``math.inf``.

    Returns:
        ``{"edges_s": [...], "counts": [...]}`` with ``len(counts) == len(edges_s) - 1``; bin ``i`` holds
        ``edges_s[i] <= d < edges_s[i + 1]``; an infinite edge is written as ``None`` (JSON ``null``).
    """
    edges = np.asarray(edges_s, dtype=np.float64)
    values = np.asarray(list(durations_s), dtype=np.float64)
    bins = np.searchsorted(edges, values, side="right") - 1  # bin i: edges[i] <= d < edges[i + 1]
    bins = bins[(bins >= 0) & (bins < len(edges) - 1)]  # values outside [edges[0], edges[-1]) are dropped
    counts = np.bincount(bins, minlength=len(edges) - 1)
    return {
        "edges_s": [
            None if math.isinf(e) else (int(e) if float(e).is_integer() else float(e)) for e in edges
        ],
        "counts": [int(c) for c in counts],
    }


def build_manifest(
    *,
    corpus: str,
    split: str,
    shards: Sequence[Mapping[str, Any]],
    durations_s: Sequence[float],
    rejected: Sequence[Mapping[str, str]] = (),
    sample_rate: int = SAMPLE_RATE_HZ,
    **extra: Any,
) -> dict[str, Any]:
    """Build the ``manifest.json`` dict of one corpus split (schema in the module docstring).

    Args:
        corpus: corpus name.
        split: split name (``train``, ``validation``, ``test``, ...).
        shards: per-shard ``{"name", "num_samples", "duration_s"}`` and, when known, ``"size_bytes"`` and
            ``"sha256"`` (e.g. :attr:`ShardWriter.shards`).
        durations_s: per-sample durations in seconds (e.g. :attr:`ShardWriter.durations_s`).
        rejected: ``{"key", "reason"[, "detail"]}`` of every input that was skipped.
        sample_rate: sample rate of the stored audio in Hz.
        **extra: additional top-level fields (e.g. ``build_params``).

    Returns:
        The manifest dict.

    Raises:
        ValueError: if the shard counts disagree with ``durations_s``.
    """
    num_samples = sum(int(s["num_samples"]) for s in shards)
    if num_samples != len(durations_s):
        raise ValueError(f"shards hold {num_samples} samples but {len(durations_s)} durations were given")
    total_s = float(sum(durations_s))
    rejected_list = [
        {"key": str(r["key"]), "reason": str(r["reason"]), "detail": str(r.get("detail", ""))}
        for r in rejected
    ]
    manifest: dict[str, Any] = {
        "corpus": corpus,
        "split": split,
        "sample_rate": int(sample_rate),
        "shards": [
            {"name": s["name"], "num_samples": int(s["num_samples"]), "duration_s": float(s["duration_s"])}
            | {k: s[k] for k in ("size_bytes", "sha256") if s.get(k) is not None}
            for s in shards
        ],
        "num_samples": num_samples,
        "duration_s": round(total_s, 6),
        "hours": round(total_s / 3600.0, 6),
        "duration_histogram": duration_histogram(durations_s),
        "rejected": rejected_list,
        "rejected_counts": dict(sorted(Counter(r["reason"] for r in rejected_list).items())),
    }
    manifest.update(extra)
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest`` to ``<folder>/manifest.json`` atomically (UTF-8, sorted keys, indented).

    Args:
        folder: the split's folder; created if missing.
        manifest: the dict from :func:`build_manifest`.

    Returns:
        Path of the written file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    tmp = folder / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(
        json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``<folder>/manifest.json``.

    Args:
        folder: a prepared corpus split folder.

    Returns:
        The manifest dict.

    Raises:
        FileNotFoundError: if the manifest is missing (the message says how to build the corpus); a
            :class:`~aero_lightning.errors.UserError`.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise UserFileNotFoundError(
            f"No {MANIFEST_NAME} in {Path(folder).resolve()} (expected {path.resolve()}). This folder is not a "
            "prepared corpus split. Build the offline demo corpus with "
            "`python -m aero_lightning.data.synth --out DIR` (DIR/train, DIR/validation, DIR/test), or point "
            "the data config at a folder of WebDataset shards with a manifest.json."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def shard_urls(folder: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Absolute paths of a split's shards, in manifest order.

    Args:
        folder: a prepared corpus split folder.
        manifest: its manifest; read from ``folder`` when ``None``.

    Returns:
        Shard file paths as strings (usable as WebDataset urls).
    """
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    return [str((folder / s["name"]).resolve()) for s in manifest["shards"]]


# --------------------------------------------------------------------------------------------- verify


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_tar_samples(path: str | os.PathLike) -> int:
    """Samples in a shard: its ``<key>.json`` members, every member's data read to the end.

    Raises:
        tarfile.TarError, OSError, EOFError: if the tar cannot be opened or ends inside a member (truncated).
    """
    count = 0
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()  # a member cut short raises here
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} holds {len(data)} of {member.size} bytes")
            if posixpath.basename(member.name).partition(".")[2] == "json":
                count += 1
    return count


def check_shard(
    path: str | os.PathLike,
    num_samples: int,
    size_bytes: int | None = None,
    sha256: str | None = None,
) -> str | None:
    """Why a finished shard does not match what its manifest (or stats file) recorded, or None if it does.

    Checks, cheapest first: the file exists; its size; its SHA-256 (a match proves the bytes, and so the sample
    count, are the ones written); without a recorded hash, the tar is read to its end and its samples counted.

    Args:
        path: the shard file.
        num_samples: samples recorded for it.
        size_bytes: recorded size in bytes, or None (manifests written before sizes were recorded).
        sha256: recorded hex SHA-256, or None.

    Returns:
        None for a sound shard, else a one-line reason: ``missing``, ``size: ...``, ``sha256: ...``,
        ``truncated: ...`` or ``sample count: ...``.
    """
    path = Path(path)
    if not path.is_file():
        return "missing: the shard file does not exist"
    size = path.stat().st_size
    if size_bytes is not None and size != size_bytes:
        return f"size: {size} bytes, {size_bytes} recorded"
    if sha256 is not None:
        actual = file_sha256(path)
        return None if actual == sha256 else f"sha256: {actual[:12]}..., {sha256[:12]}... recorded"
    try:
        found = count_tar_samples(path)
    except (tarfile.TarError, OSError, EOFError) as err:
        return f"truncated: {type(err).__name__}: {err}"
    if found != num_samples:
        return f"sample count: {found} samples, {num_samples} recorded"
    return None


def verify_split(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every shard a split's manifest lists (:func:`check_shard`).

    Args:
        folder: a prepared split folder (``manifest.json`` + shards).

    Returns:
        ``{"folder", "ok", "num_shards", "num_samples", "hours", "hashed": shards checked by SHA-256,
        "damaged": [{"name", "reason"}, ...]}``; ``ok`` is True when nothing is damaged.

    Raises:
        FileNotFoundError: if the folder has no manifest (a :class:`~aero_lightning.errors.UserError`).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    damaged = []
    for entry in manifest["shards"]:
        reason = check_shard(
            folder / entry["name"], int(entry["num_samples"]), entry.get("size_bytes"), entry.get("sha256")
        )
        if reason is not None:
            damaged.append({"name": entry["name"], "reason": reason})
    return {
        "folder": str(folder),
        "ok": not damaged,
        "num_shards": len(manifest["shards"]),
        "num_samples": int(manifest.get("num_samples", 0)),
        "hours": float(manifest.get("hours", 0.0)),
        "hashed": sum(1 for e in manifest["shards"] if e.get("sha256")),
        "damaged": damaged,
    }
