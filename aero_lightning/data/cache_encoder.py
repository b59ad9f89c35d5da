"""Run a frozen audio encoder once over a prepared split and store its outputs (:mod:`.encoder_cache`).

CLI (``key=value`` arguments, any order)::

    python -m aero_lightning.data.cache_encoder split=DIR encoder=PATH_OR_ID [type=whisper]
        [padding_free=true] [normalize=true] [torch_dtype=NAME] [attn_implementation=varlen]
        [init_from=RUN_OR_CKPT] [dtype=float16] [batch_seconds=120] [device=cpu] [progress=true]

The encoder is built as training builds it (:func:`~aero_lightning.model.build.load_encoder` with the keys of
``model.encoder``, then ``model.init_from``'s encoder weights when given), so its fingerprint is the one the training
run computes; a run whose encoder differs in any weight or setting refuses the cache. The output goes to
``<split>.encoder_cache/<fingerprint[:12]>/`` (:func:`~aero_lightning.data.encoder_cache.cache_dir`): one cache
shard per audio shard, each with a ``.stats.json`` build record, and ``manifest.json``.

Each sample is read as training reads it (:func:`~aero_lightning.data.shard_reader.parse_sample` and
:func:`~aero_lightning.data.shard_reader.decode_clips`), turned into 16-bit PCM windows (the collators'
``audio_pcm``), and encoded by the model's own feature extractor and encoder in eval mode, without gradients; the
valid frames of each clip's windows are stored back to back. Samples with audio the reader skips are listed in the
manifest with their reason; text-only samples have nothing to cache. A re-run keeps the cache shards whose build
record matches (same encoder, dtype and audio shard) and whose file still has the recorded size, and rebuilds the
rest; a cache shard is written through ``<name>.tmp`` and :func:`os.replace`, so a crash loses only the shard in
flight.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import nn

from aero_lightning.cli import run_key_value_cli
from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.encoder_cache import (
    CACHE_DTYPES,
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    EncoderFingerprint,
    cache_dir,
    encoder_fingerprint,
    frame_members,
    frames_to_array,
)
from aero_lightning.data.features import SAMPLE_RATE_HZ, pcm_windows
from aero_lightning.data.packing import to_pcm16
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import decode_clips, iter_tar, parse_sample, resolve_split
from aero_lightning.data.shards import MANIFEST_NAME, file_sha256, read_manifest
from aero_lightning.errors import UserFileNotFoundError, UserValueError
from aero_lightning.model.build import load_encoder, load_weights_from
from aero_lightning.progress import Progress

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"


class _RecordedRejects(RejectCounter):
    """A :class:`RejectCounter` that also keeps every skipped sample, for the manifest."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, str]] = []

    def reject(self, reason: str, key: str, detail: str = "", *, count: int = 1, log: bool = True) -> None:
        super().reject(reason, key, detail, count=count, log=log)
        self.records.append({"key": key, "reason": reason, "detail": detail})


def build_encoder(
    spec: Mapping[str, Any], init_from: str | None = None, attn_implementation: str | None = "varlen"
) -> tuple[nn.Module, nn.Module]:
    """The encoder adapter and feature extractor a training run with ``model.encoder = spec`` would build.

    Args:
        spec: ``model.encoder`` keys (``type``, ``name_or_path``, ``padding_free``, ``normalize``, ``torch_dtype``,
            ``attn_implementation``, ...; :func:`~aero_lightning.model.build.load_encoder`).
        init_from: a training run (folder or checkpoint) whose ``encoder.*`` weights replace the loaded ones, as
            ``model.init_from`` does; None keeps the checkpoint's.
        attn_implementation: a Whisper encoder's attention backend (``varlen`` packs the windows without padding);
            it does not enter the fingerprint.

    Returns:
        ``(encoder, feature_extractor)`` in eval mode.

    Raises:
        ValueError, OSError, FileNotFoundError: from :func:`~aero_lightning.model.build.load_encoder` and
            :func:`~aero_lightning.model.build.load_weights_from`.
    """
    try:
        encoder = load_encoder(spec, attn_implementation)
    except OSError as err:  # transformers' message for a folder or hub id it cannot load
        raise UserFileNotFoundError(f"cannot load the encoder {spec['name_or_path']!r}: {err}") from err
    if init_from:
        holder = nn.Module()
        holder.encoder = encoder  # parameter names as in AeroModel: encoder.encoder.*
        load_weights_from(holder, init_from, [r"^encoder\."])
    return encoder.eval(), encoder.build_feature_extractor().eval()


class _WindowEncoder:
    """Encodes 16-bit PCM windows in length-sorted batches of at most ``budget_samples`` padded samples."""

    def __init__(
        self, encoder: nn.Module, feature_extractor: nn.Module, device: torch.device, budget_samples: int
    ):
        self.encoder, self.feature_extractor = encoder, feature_extractor
        self.device = device
        self.budget = int(budget_samples)

    @torch.inference_mode()
    def _run(self, windows: Sequence[np.ndarray]) -> list[torch.Tensor]:
        lengths = torch.tensor([len(w) for w in windows], dtype=torch.long, device=self.device)
        pcm = torch.from_numpy(np.concatenate(windows)).to(self.device)
        features, feature_lengths = self.feature_extractor(pcm_windows(pcm, lengths), lengths)
        hidden, frames = self.encoder(features, feature_lengths)  # (W, S, D), (W,)
        return [hidden[i, :n] for i, n in enumerate(frames.tolist())]

    def __call__(self, windows: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """``(F_w, D)`` valid frames of each ``(N_w,)`` int16 window, in the order given."""
        out: list[torch.Tensor | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
        batch: list[int] = []
        for i in [*order, None]:
            if batch and (i is None or (len(batch) + 1) * len(windows[batch[0]]) > self.budget):
                for j, frames in zip(batch, self._run([windows[j] for j in batch])):
                    out[j] = frames
                batch = []
            if i is not None:
                batch.append(i)
        return out  # type: ignore[return-value]


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finished(out: Path, name: str, params: Mapping, audio_sha: str | None) -> dict | None:
    """The build record of a cache shard that a re-run can keep, else None."""
    stats_path = out / (Path(name).stem + STATS_SUFFIX)
    if not stats_path.is_file():
        return None
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tar = out / name
    if stats.get("params") != dict(params) or stats.get("audio_sha256") != audio_sha:
        return None
    if not tar.is_file() or tar.stat().st_size != stats.get("size_bytes"):
        return None
    return stats


def _cache_shard(
    url: str,
    entry: Mapping,
    out: Path,
    params: Mapping,
    encode: _WindowEncoder,
    counter: AudioTokenCounter,
    buffer_samples: int,
    bar: Progress,
) -> dict:
    """Write the cache shard of one audio shard; returns its build record."""
    start = time.perf_counter()
    name, dtype = entry["name"], params["dtype"]
    rejects = _RecordedRejects()
    stats = {"cached": 0, "clips": 0, "frames": 0, "audio_s": 0.0, "text_only": 0}
    tmp = out / f"{name}.tmp"
    pending: list[tuple[str, list[np.ndarray]]] = []

    def flush(writer: wds.TarWriter) -> None:
        windows, spans = [], []  # per clip: (first window, number of windows)
        for _, clips in pending:
            for clip in clips:
                pcm, begin = to_pcm16(clip), 0
                spans.append((len(windows), len(counter.window_lengths(len(pcm)))))
                for length in counter.window_lengths(len(pcm)):
                    windows.append(pcm[begin : begin + length])
                    begin += length
        frames = encode(windows)
        clip_index = 0
        for key, clips in pending:
            arrays, clip_frames = [], []
            for _ in clips:
                first, count = spans[clip_index]
                clip_index += 1
                joined = torch.cat(frames[first : first + count])  # (F, D): the clip's windows back to back
                arrays.append(frames_to_array(joined, dtype))
                clip_frames.append(int(joined.shape[0]))
            record = {"clip_samples": [len(c) for c in clips], "frames": clip_frames, "dtype": dtype}
            writer.write({"__key__": key, "json": record, **dict(zip(frame_members(len(clips)), arrays))})
            stats["cached"] += 1
            stats["clips"] += len(clips)
            stats["frames"] += sum(clip_frames)
            stats["audio_s"] += sum(len(c) for c in clips) / SAMPLE_RATE_HZ
        pending.clear()

    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, user="", group="", mode=0o644, mtime=0) as writer:
                buffered = 0
                for raw in iter_tar(url, rejects):
                    bar.update(1)
                    item = parse_sample(raw, rejects)
                    if item is None:
                        continue
                    if not item["clip_samples"]:  # text only: nothing for the encoder
                        stats["text_only"] += 1
                        continue
                    clips = decode_clips(item, rejects)
                    if clips is None:
                        continue
                    pending.append((item["key"], clips))
                    buffered += sum(len(c) for c in clips)
                    if buffered >= buffer_samples:
                        flush(writer)
                        buffered = 0
                if pending:
                    flush(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
    finally:
        tmp.unlink(missing_ok=True)
    stats.update(
        shard=name,
        audio_shard=name,
        audio_sha256=entry.get("sha256"),
        params=dict(params),
        size_bytes=(out / name).stat().st_size,
        sha256=file_sha256(out / name),
        rejected=rejects.records,
        build_s=time.perf_counter() - start,
    )
    _write_json(out / (Path(name).stem + STATS_SUFFIX), stats)
    return stats


def cache_split(
    split: str | os.PathLike,
    encoder: nn.Module,
    feature_extractor: nn.Module,
    dtype: str = "float16",
    batch_seconds: float = 120.0,
    device: str = "cpu",
    progress: bool = True,
    fingerprint: EncoderFingerprint | None = None,
) -> dict[str, Any]:
    """Cache ``encoder``'s outputs for every sample with audio of a prepared split.

    Args:
        split: the prepared split folder (audio shards + ``manifest.json``).
        encoder: the frozen encoder adapter (``AeroModel.encoder``, or :func:`build_encoder`'s).
        feature_extractor: its feature extractor (``AeroModel.feature_extractor``).
        dtype: storage dtype of the frames, a key of :data:`~aero_lightning.data.encoder_cache.CACHE_DTYPES`.
        batch_seconds: padded audio seconds per encoder call (windows are sorted by length first), and the audio
            read ahead before encoding.
        device: where the encoder runs (``cpu``, ``cuda``, ``cuda:1``).
        progress: show progress (a bar on a terminal, log lines otherwise).
        fingerprint: ``encoder_fingerprint(encoder, feature_extractor)`` when the caller has it already.

    Returns:
        The cache manifest: ``format``, ``format_version``, ``fingerprint`` (hex SHA-256) and
        ``fingerprint_details``, ``dtype``, ``hidden_size``, ``split`` (absolute path), ``shards`` (per audio shard:
        ``name``, ``audio_shard``, ``audio_sha256``, ``cached``, ``clips``, ``frames``, ``audio_s``, ``text_only``,
        ``size_bytes``, ``sha256``), ``num_samples`` (cached), ``text_only``, ``audio_s``, ``size_bytes``,
        ``bytes_per_audio_s``, ``rejected`` (``{key: "<shard file>:<key>", reason, detail}``), ``rejected_counts``,
        ``build_s`` (the shards' build time summed, kept shards included), ``folder``.

    Raises:
        UserFileNotFoundError, UserValueError: for a split folder that is missing or empty, or a bad ``dtype`` or
            ``batch_seconds``.
    """
    if dtype not in CACHE_DTYPES:
        raise UserValueError(f"dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    if batch_seconds <= 0:
        raise UserValueError(f"batch_seconds must be > 0, got {batch_seconds}")
    split = Path(split).resolve()
    urls = resolve_split(split)
    audio_manifest = read_manifest(split)
    fingerprint = fingerprint or encoder_fingerprint(encoder, feature_extractor)
    out = cache_dir(split, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    params = {"fingerprint": fingerprint.sha256, "dtype": dtype, "format_version": CACHE_FORMAT_VERSION}
    torch_device = torch.device(device)
    encoder.eval().to(torch_device)
    feature_extractor.eval().to(torch_device)
    budget = round(batch_seconds * SAMPLE_RATE_HZ)
    encode = _WindowEncoder(encoder, feature_extractor, torch_device, budget)
    counter = AudioTokenCounter()

    records: dict[int, dict] = {}
    todo = []
    for i, entry in enumerate(audio_manifest["shards"]):
        done = _finished(out, entry["name"], params, entry.get("sha256"))
        if done is not None:
            records[i] = done
        else:
            todo.append(i)
    log.info(
        "encoder cache %s for %s: %d shard(s), %d already built (kept), %d to build on %s",
        fingerprint.short, split, len(urls), len(records), len(todo), torch_device,
    )  # fmt: skip
    total = sum(int(audio_manifest["shards"][i].get("num_samples") or 0) for i in todo) or None
    with Progress(total, f"encoder cache {split.name}", unit="utt", enabled=progress) as bar:
        for i in todo:
            entry = audio_manifest["shards"][i]
            records[i] = _cache_shard(urls[i], entry, out, params, encode, counter, budget, bar)

    ordered = [records[i] for i in range(len(urls))]
    keep = (
        "audio_shard",
        "audio_sha256",
        "cached",
        "clips",
        "frames",
        "audio_s",
        "text_only",
        "size_bytes",
        "sha256",
    )
    shards = [{"name": s["shard"], **{k: s[k] for k in keep}} for s in ordered]
    rejected = [r for s in ordered for r in s["rejected"]]
    audio_s = sum(s["audio_s"] for s in ordered)
    size = sum(s["size_bytes"] for s in ordered)
    counts: dict[str, int] = {}
    for r in rejected:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint.sha256,
        "fingerprint_details": fingerprint.details,
        "dtype": dtype,
        "hidden_size": int(encoder.hidden_size),
        "split": str(split),
        "shards": shards,
        "num_samples": sum(s["cached"] for s in ordered),
        "text_only": sum(s["text_only"] for s in ordered),
        "audio_s": round(audio_s, 6),
        "size_bytes": size,
        "bytes_per_audio_s": size / audio_s if audio_s else None,
        "rejected": rejected,
        "rejected_counts": dict(sorted(counts.items())),
        "build_s": round(sum(s["build_s"] for s in ordered), 3),
    }
    _write_json(out / MANIFEST_NAME, manifest)
    log.info(
        "encoder cache %s: %d samples (%.3f h of audio, %d text-only), %.1f MB, %.0f bytes per audio second, "
        "rejected %s -> %s",
        fingerprint.short, manifest["num_samples"], audio_s / 3600, manifest["text_only"], size / 1e6,
        manifest["bytes_per_audio_s"] or 0.0, manifest["rejected_counts"] or "none", out,
    )  # fmt: skip
    return manifest | {"folder": str(out)}


def cache_command(
    split: str,
    encoder: str,
    type: str = "whisper",  # noqa: A002 - the model.encoder key's name
    padding_free: bool | None = None,
    normalize: bool | None = None,
    torch_dtype: str | None = None,
    attn_implementation: str = "varlen",
    init_from: str | None = None,
    dtype: str = "float16",
    batch_seconds: float = 120.0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """The CLI's work: :func:`build_encoder` from ``model.encoder``-style keys, then :func:`cache_split`.

    Raises:
        UserFileNotFoundError: for an encoder that cannot be loaded, and as :func:`cache_split`.
        UserValueError: for a setting of another encoder type (``padding_free`` is Whisper's, ``normalize`` the
            SSL encoders'), and as :func:`cache_split`.
    """
    resolve_split(split)  # a missing or empty split fails before the encoder loads
    spec: dict[str, Any] = {"type": type, "name_or_path": encoder, "torch_dtype": torch_dtype}
    if padding_free is not None:
        if type != "whisper":
            raise UserValueError(f"padding_free is a Whisper encoder setting; type={type} has none")
        spec["padding_free"] = padding_free
    if normalize is not None:
        if type == "whisper":
            raise UserValueError("normalize is a HuBERT / wav2vec 2.0 setting; the Whisper encoder has none")
        spec["normalize"] = normalize
    enc, features = build_encoder(spec, init_from, attn_implementation)
    return cache_split(
        split, enc, features, dtype=dtype, batch_seconds=batch_seconds, device=device, progress=progress
    )


# ---------------------------------------------------------------------------------------------- CLI

USAGE = """\
usage: python -m aero_lightning.data.cache_encoder split=DIR encoder=PATH_OR_ID [key=value ...]

Runs a frozen encoder once over a prepared split and writes its output frames to
DIR.encoder_cache/<fingerprint>/ (train with data.encoder_cache=true). Give the encoder exactly as the training
run's model.encoder (and model.init_from) does: a run whose encoder differs refuses the cache.

  split=DIR                prepared split folder (shards + manifest.json), required
  encoder=PATH_OR_ID       model.encoder.name_or_path, required
  type=whisper             model.encoder.type: whisper | hubert | wav2vec2
  padding_free=true        model.encoder.padding_free (whisper)
  normalize=true           model.encoder.normalize (hubert, wav2vec2)
  torch_dtype=NAME         model.encoder.torch_dtype (default: the checkpoint's)
  init_from=RUN_OR_CKPT    model.init_from.ckpt: take the encoder weights from this training run
  dtype=float16            stored dtype: float16 | bfloat16 | float32
  batch_seconds=120        padded audio seconds per encoder call
  device=cpu               cpu | cuda | cuda:N
  attn_implementation=varlen   the Whisper encoder's attention backend (not part of the fingerprint)
  progress=true|false      progress bar or log lines (default: true)
"""

_STR_KEYS = ("split", "encoder", "type", "torch_dtype", "attn_implementation", "init_from", "dtype", "device")
_BOOL_KEYS = ("padding_free", "normalize", "progress")


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
    return value.lower() in ("true", "1", "yes")


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` arguments into :func:`cache_command` keyword arguments.

    Raises:
        ValueError: on a malformed argument, an unknown or repeated key, a bad value, or a missing ``split`` /
            ``encoder``.
    """
    kwargs: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {arg!r}")
        if key in kwargs:
            raise ValueError(f"{key} given twice")
        if key not in (*_STR_KEYS, *_BOOL_KEYS, "batch_seconds"):
            raise ValueError(
                f"unknown key {key!r}; known keys: {', '.join((*_STR_KEYS, *_BOOL_KEYS, 'batch_seconds'))}"
            )
        try:
            if key in _BOOL_KEYS:
                kwargs[key] = _bool(value)
            elif key == "batch_seconds":
                kwargs[key] = float(value)
            else:
                kwargs[key] = value
        except ValueError:
            raise ValueError(f"bad value for {key}: {value!r}") from None
    for required in ("split", "encoder"):
        if not kwargs.get(required):
            raise ValueError(f"{required}= is required")
    return kwargs


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; see :data:`USAGE`.

    Returns:
        The cache manifest (:func:`cache_split`).

    Raises:
        SystemExit: with the usage text on ``-h``/``--help`` (status 0), on bad arguments or a user error such as
            a missing split folder or encoder checkpoint (status 2).
    """
    return run_key_value_cli(list(sys.argv[1:] if argv is None else argv), USAGE, parse_args, cache_command)


if __name__ == "__main__":
    main()
