"""Cached outputs of a frozen audio encoder: fingerprint, folder layout, and the reader the training stream uses.

When the encoder is frozen (projector-only or projector + LLM training, the tiny-audio and SLAM-ASR recipes), its
output for a clip never changes, yet uncached training decodes the audio, computes log-mel and runs the encoder on
every step of every epoch. ``python -m aero_lightning.data.cache_encoder`` (:mod:`aero_lightning.data.cache_encoder`)
runs the encoder once over a prepared split and stores its output frames; training with ``data.encoder_cache=true``
reads them instead of the audio.

Layout, beside the prepared split ``<split>/`` (one folder per encoder)::

    <split>.encoder_cache/<fingerprint[:12]>/<audio shard name>.tar         # one cache shard per audio shard
    <split>.encoder_cache/<fingerprint[:12]>/<audio shard name>.stats.json  # that shard's build record
    <split>.encoder_cache/<fingerprint[:12]>/manifest.json                  # the encoder's fingerprint, shards

A cache shard is a WebDataset tar (written by ``webdataset.TarWriter``): per sample key with audio,
``<key>.json`` = ``{"clip_samples": [...], "frames": [...], "dtype": ...}`` (the decoded length of each clip in
samples and its encoder frames) and the frames of each clip: ``<key>.npy`` for a sample with one clip, or
``<key>.0.npy``, ``<key>.1.npy``, ... for several clips, in the order of the audio members. Each array is
``(F, D)``: the encoder's output frames of the clip (before the projector, which trains), its 30 s windows'
valid frames back to back (``F = sum of encoder frames per window``). ``float16`` and ``float32`` arrays are
stored as such; ``bfloat16``, which numpy lacks, as its bit pattern in ``int16`` arrays (``torch.from_numpy(a)
.view(torch.bfloat16)``). Text-only samples have nothing to cache and no entry.

The fingerprint (:func:`encoder_fingerprint`) is a SHA-256 over the encoder's weights, its config, the adapter's
settings (``padding_free``, ``normalize``, ...) and the feature extractor's (log-mel bins, padding to 30 s, the
mel filters, FFT size, hop, sample rate). Training refuses a cache whose fingerprint differs from its model's
encoder, and an encoder that trains at any point of the run (:func:`check_encoder_frozen`).

Samples the training stream reads but the cache lacks are skipped and counted: with the reason the cache build
gave them (a ``corrupt_audio`` clip is skipped as uncached training would), else ``missing_cache_entry``; an entry
whose frames do not fit its clips is ``bad_cache_entry``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aero_lightning.data.features import HOP_LENGTH, N_FFT, SAMPLE_RATE_HZ, WINDOW_SAMPLES
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import sample_label
from aero_lightning.data.shards import MANIFEST_NAME, read_manifest, shard_urls
from aero_lightning.errors import UserFileNotFoundError, UserValueError

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_DTYPES",
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "CACHE_SUFFIX",
    "CachedSplit",
    "EncoderCacheReader",
    "EncoderFingerprint",
    "cache_dir",
    "cache_root",
    "check_encoder_frozen",
    "clip_frames",
    "encoder_fingerprint",
    "frame_members",
    "frames_from_array",
    "frames_to_array",
    "model_encoder_fingerprint",
    "resolve_cache",
]

CACHE_FORMAT = "aero_encoder_cache"
"""``format`` of a cache manifest."""
CACHE_FORMAT_VERSION = 1
"""Bumped whenever the bytes written for the same encoder and audio change."""
CACHE_SUFFIX = ".encoder_cache"
"""Suffix of the folder beside a split that holds its caches, one subfolder per encoder fingerprint."""
SHORT_FINGERPRINT = 12
"""Hex digits of the fingerprint that name a cache folder (the manifest holds all 64)."""
CACHE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
"""Storage dtypes of cached frames. ``float32`` doubles the bytes of the 16-bit ones; it is there for exact checks
against uncached training."""

# config keys that do not change a frozen encoder's output: bookkeeping, the storage dtype (the weights' values are
# hashed instead) and regularisers that act in training mode only (a frozen encoder runs in eval mode)
_UNHASHED_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "architectures", "name_or_path"}
_TRAINING_ONLY_KEY = re.compile(r"dropout|layerdrop|^mask_|spec_augment")


# ------------------------------------------------------------------------------------------ fingerprint


@dataclass(frozen=True)
class EncoderFingerprint:
    """What a cache was computed with.

    Attributes:
        sha256: hex SHA-256 over ``details`` (canonical JSON).
        details: ``{"encoder": class name, "weights_sha256", "config": {...}, "adapter": {...}, "features":
            {...}, "format_version"}``, written into the cache manifest so a mismatch can be explained.
    """

    sha256: str
    details: dict = field(compare=False)

    @property
    def short(self) -> str:
        """The first :data:`SHORT_FINGERPRINT` hex digits: the cache folder's name."""
        return self.sha256[:SHORT_FINGERPRINT]


def _plain_settings(module: nn.Module) -> dict[str, Any]:
    """A module's own plain settings (bools, numbers, strings): ``padding_free``, ``normalize``, ``num_mel_bins``."""
    return {
        k: v
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))
    }


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Values of a tensor as bytes: floats as float32 (a bf16 copy of fp32 weights hashes as its rounded values)."""
    t = t.detach().to("cpu")
    if t.is_floating_point():
        t = t.float()
    return t.contiguous().numpy().tobytes()


def _hash_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        digest.update(f"{name}:{tuple(t.shape)}:".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def _config_dict(encoder: nn.Module) -> dict[str, Any]:
    """The HF config of an encoder adapter (``encoder.encoder.config``) without keys that do not change its output."""
    hf = getattr(encoder, "encoder", encoder)
    config = getattr(hf, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {
        k: v
        for k, v in sorted(config.to_dict().items())
        if not k.startswith("_") and k not in _UNHASHED_CONFIG_KEYS and not _TRAINING_ONLY_KEY.search(k)
    }


def encoder_fingerprint(encoder: nn.Module, feature_extractor: nn.Module) -> EncoderFingerprint:
    """Fingerprint of a frozen encoder and the features it reads: what its cached outputs depend on.

    Args:
        encoder: the audio encoder adapter (``AeroModel.encoder``: a Whisper or SSL adapter).
        feature_extractor: its feature extractor (``AeroModel.feature_extractor``: Whisper log-mel or the waveform
            pass-through of the SSL encoders).

    Returns:
        An :class:`EncoderFingerprint` over the encoder's weights and persistent buffers (values as float32, so the
        storage dtype alone does not change it), its HF config without bookkeeping and training-only regularisers
        (dropout, LayerDrop, SpecAugment act only in training mode, and a frozen encoder runs in eval mode), the
        adapter's settings, the feature extractor's settings and buffers (the mel filters and the Hann window), the
        STFT constants (:data:`~aero_lightning.data.features.N_FFT`, hop, sample rate, window length) and
        :data:`CACHE_FORMAT_VERSION`. The attention backend is not part of it: backends agree to rounding.
    """
    details = {
        "format_version": CACHE_FORMAT_VERSION,
        "encoder": type(encoder).__name__,
        "weights_sha256": _hash_tensors(encoder.state_dict().items()),
        "config": _config_dict(encoder),
        "adapter": _plain_settings(encoder),
        "features": {
            "class": type(feature_extractor).__name__,
            "settings": _plain_settings(feature_extractor),
            "buffers_sha256": _hash_tensors(feature_extractor.named_buffers()),
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "sample_rate_hz": SAMPLE_RATE_HZ,
            "window_samples": WINDOW_SAMPLES,
            "input": "pcm16",
        },
    }
    canonical = json.dumps(details, sort_keys=True, default=str).encode()
    return EncoderFingerprint(hashlib.sha256(canonical).hexdigest(), details)


def model_encoder_fingerprint(model: nn.Module) -> EncoderFingerprint:
    """:func:`encoder_fingerprint` of an ``AeroModel``'s ``encoder`` and ``feature_extractor``."""
    return encoder_fingerprint(model.encoder, model.feature_extractor)


def check_encoder_frozen(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    unfreeze_patterns: Sequence[str] = (),
    fixed: Iterable[str] = (),
) -> None:
    """Refuse cached encoder outputs for a run whose encoder trains at any point.

    Args:
        named_parameters: the model's ``named_parameters()`` (encoder parameters are named ``encoder.*``).
        unfreeze_patterns: ``module.unfreeze.patterns`` (regexes; empty when the run has no unfreeze stage).
        fixed: parameters the encoder keeps frozen itself (``AeroModel.fixed_parameters``), which no schedule trains.

    Raises:
        UserValueError: if an encoder parameter is trainable (``model.freeze`` does not cover the encoder, or an
            adapter such as LoRA trains inside it), or if ``unfreeze_patterns`` match an encoder parameter.
    """
    fixed = set(fixed)
    params = [(n, p) for n, p in named_parameters if n.startswith("encoder.")]
    trainable = [n for n, p in params if p.requires_grad]
    if trainable:
        fix = (
            "LoRA adapters inside the encoder train it: adapt the LLM only (model/lora=llm)"
            if any(".lora_" in n for n in trainable)
            else "add '^encoder\\.' to model.freeze"
        )
        raise UserValueError(
            f"data.encoder_cache=true needs a frozen encoder, but {len(trainable)} encoder parameter tensor(s) "
            f"train (e.g. {trainable[0]}): {fix}, or set data.encoder_cache=false"
        )
    patterns = [re.compile(p) for p in unfreeze_patterns]
    later = [n for n, _ in params if n not in fixed and any(p.search(n) for p in patterns)]
    if later:
        raise UserValueError(
            f"data.encoder_cache=true needs an encoder frozen for the whole run, but module.unfreeze.patterns "
            f"{list(unfreeze_patterns)} unfreeze {len(later)} encoder parameter tensor(s) (e.g. {later[0]}), after "
            "which the cached outputs would be stale: leave the encoder out of the patterns, or train that stage "
            "as a separate run with data.encoder_cache=false"
        )


# ------------------------------------------------------------------------------------------ layout


def cache_root(split_dir: str | os.PathLike) -> Path:
    """``<split>.encoder_cache``: the folder beside a split that holds its caches (one subfolder per encoder)."""
    split = Path(split_dir).resolve()
    return split.with_name(split.name + CACHE_SUFFIX)


def cache_dir(split_dir: str | os.PathLike, fingerprint: EncoderFingerprint | str) -> Path:
    """``<split>.encoder_cache/<fingerprint[:12]>``: the cache of one encoder for one split."""
    sha = fingerprint.sha256 if isinstance(fingerprint, EncoderFingerprint) else str(fingerprint)
    return cache_root(split_dir) / sha[:SHORT_FINGERPRINT]


def clip_frames(num_samples: int, counter) -> list[int]:
    """Encoder frames of each 30 s window of a clip of ``num_samples`` samples, for the model's
    :class:`~aero_lightning.data.audio_tokens.AudioTokenCounter` ``counter``."""
    return [int(counter.encoder_frames(w)) for w in counter.window_lengths(int(num_samples))]


def frames_to_array(frames: torch.Tensor, dtype: str) -> np.ndarray:
    """``(F, D)`` frames as the array stored in a cache shard (``bfloat16`` as its bits in ``int16``).

    Raises:
        ValueError: for a dtype not in :data:`CACHE_DTYPES`.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    t = frames.detach().to(device="cpu", dtype=CACHE_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.numpy()


def frames_from_array(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`frames_to_array`: a ``(F, D)`` tensor of ``dtype``.

    Raises:
        ValueError: if the array's dtype is not the one ``dtype`` is stored as.
    """
    stored = np.int16 if dtype == "bfloat16" else np.dtype(dtype)
    if array.dtype != stored:
        raise ValueError(f"frames stored as {array.dtype}, the cache's dtype {dtype} is stored as {stored}")
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def frame_members(num_clips: int) -> list[str]:
    """Member extensions of a sample's frames: ``npy`` for one clip, ``0.npy``, ``1.npy``, ... for several."""
    return ["npy"] if num_clips == 1 else [f"{i}.npy" for i in range(num_clips)]


# ------------------------------------------------------------------------------------------ binding


@dataclass
class CachedSplit:
    """A split's cache, checked against its audio shards and the model's encoder (:func:`resolve_cache`).

    Attributes:
        folder: the cache folder.
        shards: ``{audio shard path: cache shard path}`` for every shard of the split.
        dtype: storage dtype (a key of :data:`CACHE_DTYPES`).
        hidden_size: width ``D`` of the cached frames.
        build_rejects: ``{"<shard file>:<key>": reason}`` of samples the cache build skipped.
    """

    folder: Path
    shards: dict[str, str]
    dtype: str
    hidden_size: int
    build_rejects: dict[str, str]


def _rebuild_hint(split: Path) -> str:
    return (
        f"build it with `python -m aero_lightning.data.cache_encoder split={split} encoder=...` using the "
        "encoder settings and weights of this run (model.encoder, model.init_from)"
    )


def resolve_cache(split_dir: str | os.PathLike, fingerprint: EncoderFingerprint) -> CachedSplit:
    """Find and check the cache of ``fingerprint``'s encoder for a prepared split, before training starts.

    Args:
        split_dir: the prepared split folder (audio shards + ``manifest.json``).
        fingerprint: the model's encoder (:func:`model_encoder_fingerprint`).

    Returns:
        The :class:`CachedSplit`.

    Raises:
        UserFileNotFoundError: if the split has no cache of this encoder (the message names the fingerprints of
            the caches it has, and what differs from the newest).
        UserValueError: if the cache's manifest names another fingerprint or format, or the cache does not cover
            every audio shard as the split's manifest lists it now (a shard missing, cut short, or an audio shard
            rebuilt since: its SHA-256 differs from the one the cache was built from).
    """
    split = Path(split_dir).resolve()
    folder = cache_dir(split, fingerprint)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        others = sorted(cache_root(split).glob(f"*/{MANIFEST_NAME}"))
        if not others:
            raise UserFileNotFoundError(
                f"data.encoder_cache=true but {split} has no encoder cache ({cache_root(split)} is missing); "
                + _rebuild_hint(split)
            )
        newest = max(others, key=lambda p: p.stat().st_mtime)
        theirs = json.loads(newest.read_text(encoding="utf-8"))
        differ = _fingerprint_difference(theirs.get("fingerprint_details") or {}, fingerprint.details)
        raise UserValueError(
            f"the encoder cache of {split} was built for encoder {theirs.get('fingerprint', '?')[:SHORT_FINGERPRINT]} "
            f"({', '.join(p.parent.name for p in others)}), but this run's encoder is {fingerprint.short} "
            f"(they differ in: {differ}); {_rebuild_hint(split)}"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != CACHE_FORMAT or manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise UserValueError(
            f"{manifest_path} is not a version {CACHE_FORMAT_VERSION} {CACHE_FORMAT} manifest; {_rebuild_hint(split)}"
        )
    if manifest.get("fingerprint") != fingerprint.sha256:
        raise UserValueError(
            f"{manifest_path} names encoder {manifest.get('fingerprint')}, this run's encoder is "
            f"{fingerprint.sha256}; {_rebuild_hint(split)}"
        )
    audio_manifest = read_manifest(split)
    cached = {s["audio_shard"]: s for s in manifest.get("shards", [])}
    shards: dict[str, str] = {}
    problems = []
    for url, entry in zip(shard_urls(split, audio_manifest), audio_manifest["shards"]):
        name = entry["name"]
        record = cached.get(name)
        path = folder / name
        if record is None or not path.is_file():
            problems.append(f"{name}: not cached")
        elif path.stat().st_size != record.get("size_bytes"):
            problems.append(
                f"{name}: cache shard is {path.stat().st_size} bytes, built as {record.get('size_bytes')}"
            )
        elif entry.get("sha256") and record.get("audio_sha256") and entry["sha256"] != record["audio_sha256"]:
            problems.append(f"{name}: the audio shard was rebuilt after the cache")
        else:
            shards[url] = str(path)
    if problems:
        raise UserValueError(
            f"the encoder cache {folder} does not match the split {split} ({len(problems)} of "
            f"{len(audio_manifest['shards'])} shards: {'; '.join(problems[:3])}); rerun the cache_encoder command "
            "(it rebuilds only what is missing or stale)"
        )
    return CachedSplit(
        folder=folder,
        shards=shards,
        dtype=str(manifest["dtype"]),
        hidden_size=int(manifest["hidden_size"]),
        build_rejects={r["key"]: r["reason"] for r in manifest.get("rejected", [])},
    )


def _fingerprint_difference(theirs: Mapping, ours: Mapping) -> str:
    """Which parts of two fingerprints' details differ, e.g. ``weights_sha256, config.d_model``."""
    differ = []
    for part in ("format_version", "encoder", "weights_sha256", "adapter", "features"):
        if theirs.get(part) != ours.get(part):
            differ.append(part)
    a, b = theirs.get("config") or {}, ours.get("config") or {}
    differ += [f"config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)][:5]
    return ", ".join(differ) or "the fingerprint only"


# ------------------------------------------------------------------------------------------ reading


class _ShardIndex:
    """Random access to a cache shard's members by key: the tar's headers are read once (``tarfile``'s seeking
    mode jumps over member data), then each member is one seek and one read."""

    def __init__(self, path: str):
        self.path = path
        self.error: str | None = None
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            with tarfile.open(fileobj=self._file, mode="r:") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        key, _, ext = member.name.partition(".")
                        self.members.setdefault(key, {})[ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as err:
            self.error = f"{type(err).__name__}: {err}"

    def read(self, key: str, ext: str) -> bytes:
        offset, size = self.members[key][ext]
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise OSError(f"{self.path} ends inside {key}.{ext}")
        return data

    def close(self) -> None:
        self._file.close()


class EncoderCacheReader:
    """Cached frames of the samples of a training stream, looked up by shard and key.

    One reader per DataLoader worker (it holds open files): build it in the worker, from picklable arguments.

    Args:
        shards: ``{audio shard path: cache shard path}`` (the union of the :class:`CachedSplit` ``shards``).
        dtype: the caches' storage dtype.
        hidden_size: the caches' frame width.
        build_rejects: ``{"<shard file>:<key>": reason}`` of the samples the builds skipped.
        max_open: cache shards kept open at once (least recently used closed first).
    """

    def __init__(
        self,
        shards: Mapping[str, str],
        dtype: str,
        hidden_size: int,
        build_rejects: Mapping[str, str] | None = None,
        max_open: int = 8,
    ):
        self.shards = dict(shards)
        self.dtype = dtype
        self.hidden_size = int(hidden_size)
        self.build_rejects = dict(build_rejects or {})
        self.max_open = int(max_open)
        self._open: OrderedDict[str, _ShardIndex] = OrderedDict()

    def _index(self, path: str) -> _ShardIndex:
        index = self._open.pop(path, None)
        if index is None:
            index = _ShardIndex(path)
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[path] = index
        return index

    def close(self) -> None:
        """Close every open cache shard."""
        while self._open:
            self._open.popitem()[1].close()

    def read(
        self, item: Mapping, rejects: RejectCounter, counter
    ) -> tuple[list[torch.Tensor], list[int]] | None:
        """The cached frames of a sample :func:`~aero_lightning.data.shard_reader.parse_sample` accepted.

        Args:
            item: ``{"key", "shard", "clip_samples", ...}``: ``clip_samples`` are each clip's samples as its JSON
                states them.
            rejects: counter for skipped samples: ``missing_cache_entry`` (or the reason the cache build gave the
                sample, e.g. ``corrupt_audio``), ``bad_cache_entry`` (unreadable, or frames that do not fit the
                clips), ``duration_mismatch`` (as :func:`~aero_lightning.data.shard_reader.decode_waveform`: the
                clip's decoded length fills another number of audio tokens than its JSON duration).
            counter: the model's :class:`~aero_lightning.data.audio_tokens.AudioTokenCounter`.

        Returns:
            ``(frames, clip_samples)``: per clip a ``(F_i, D)`` tensor of the cache's dtype and its decoded length in
            samples (``([], [])`` for a text-only sample, which needs no entry), or None if the sample is skipped.
        """
        expected = list(item["clip_samples"])
        if not expected:
            return [], []
        key = item["key"]
        label = sample_label(key, item.get("shard"))
        path = self.shards.get(item.get("shard"))
        index = self._index(path) if path is not None else None
        entry = index.members.get(key) if index is not None else None
        if entry is None:
            if index is not None and index.error:
                rejects.reject("bad_cache_entry", label, f"{path}: {index.error}")
            elif label in self.build_rejects:
                # the build skipped it for a reason uncached training skips it for too: count that reason
                rejects.reject(self.build_rejects[label], label, "(found when the encoder cache was built)")
            else:
                rejects.reject("missing_cache_entry", label, f"not in {path}")
            return None
        try:
            meta = json.loads(index.read(key, "json"))
            clip_samples = [int(n) for n in meta["clip_samples"]]
            arrays = [
                np.load(io.BytesIO(index.read(key, ext)), allow_pickle=False)
                for ext in frame_members(len(clip_samples))
            ]
            frames = [frames_from_array(a, self.dtype) for a in arrays]
        except (KeyError, ValueError, TypeError, OSError) as err:
            rejects.reject("bad_cache_entry", label, f"{type(err).__name__}: {err}")
            return None
        if len(clip_samples) != len(expected):
            rejects.reject(
                "bad_cache_entry",
                label,
                f"{len(clip_samples)} cached clip(s), the sample has {len(expected)}",
            )
            return None
        for n_cached, n_json in zip(clip_samples, expected):
            # decode_waveform's check, on the length the build decoded
            if counter(n_cached) != counter(n_json):
                rejects.reject("duration_mismatch", label, f"{n_cached} samples, json says {n_json}")
                return None
        for f, n in zip(frames, clip_samples):
            want = (sum(clip_frames(n, counter)), self.hidden_size)
            if tuple(f.shape) != want:
                rejects.reject("bad_cache_entry", label, f"frames {tuple(f.shape)}, expected {want}")
                return None
        return frames, clip_samples
