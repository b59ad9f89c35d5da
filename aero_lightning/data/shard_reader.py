"""Reading prepared WebDataset shards: one reader for training, validation, test and benchmark sources.

A prepared split is a folder of tar shards plus ``manifest.json`` (:mod:`aero_lightning.data.shards`). Every
consumer reads it with the same three steps:

1. :func:`iter_tar` groups a shard's tar members into raw samples by key, without decoding. A shard that is
   missing or cut short is counted (``unreadable_shard`` / ``truncated_tar``) and the samples before the damage
   are still yielded.
2. :func:`parse_sample` validates the JSON member (``duration_s``, non-empty ``messages``) and finds the audio
   member (``flac``, ``wav``, ``ogg`` or ``mp3``) without decoding audio, so the training stream can cost and plan
   a sample before paying for its audio.
3. :func:`decode_waveform` decodes the audio member and checks it is 16 kHz mono and non-empty (and, given the
   model's audio token counter, that it fills as many audio tokens as ``duration_s`` promised).

Skipped samples are counted in a :class:`~aero_lightning.data.rejects.RejectCounter`, never raised.

The training stream (:mod:`aero_lightning.data.stream`) draws shards at random from these functions; validation,
test and benchmark shard sources read a finite, ordered pass: :class:`ShardPass` (a DataLoader dataset split by
rank x worker) or :func:`iter_samples` (one process, all shards).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import IterableDataset, get_worker_info

from aero_lightning.data.chat import reference_text
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shards import read_manifest, shard_urls
from aero_lightning.errors import UserFileNotFoundError, UserValueError

__all__ = [
    "AUDIO_EXTENSIONS",
    "ShardPass",
    "audio_members",
    "count_audio_parts",
    "decode_clips",
    "decode_waveform",
    "dist_rank_world",
    "iter_samples",
    "iter_tar",
    "parse_sample",
    "read_sample",
    "resolve_split",
    "sample_label",
    "shard_sample_counts",
    "split_urls",
]

AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")
"""Audio member extensions accepted in shards, in order of preference."""
_NUMBERED_AUDIO = re.compile(r"^(\d+)\.(?:flac|wav|ogg|mp3)$")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def sample_label(key: str, shard: str | None) -> str:
    """How warnings name a shard sample: ``<shard file name>:<key>``, or the key alone when the shard is unknown.

    Args:
        key: the sample key.
        shard: the shard's path or url (``__url__`` of :func:`iter_tar`), or None.
    """
    return f"{posixpath.basename(str(shard))}:{key}" if shard else key


# ------------------------------------------------------------------------------------------ split folders


def resolve_split(folder: str | os.PathLike) -> list[str]:
    """Shard urls of a prepared split folder, checked before any training or evaluation starts.

    Args:
        folder: a prepared split folder (shards + ``manifest.json``).

    Returns:
        Absolute shard paths in manifest order.

    Raises:
        FileNotFoundError: if the folder or its ``manifest.json`` does not exist.
        ValueError: if the manifest lists no shards or a listed shard file is missing.
        Both are :class:`~aero_lightning.errors.UserError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserFileNotFoundError(
            f"data folder {folder.resolve()} does not exist; build the demo corpus with "
            "`python -m aero_lightning.data.synth --out DIR` or point data.*_dir at a prepared split"
        )
    manifest = read_manifest(folder)
    urls = shard_urls(folder, manifest)
    if not urls:
        raise UserValueError(
            f"{folder.resolve()}/manifest.json lists no shards: the split is empty, rebuild it"
        )
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise UserValueError(
            f"{len(missing)} shard(s) listed in {folder}/manifest.json are missing, e.g. {missing[0]}; run "
            f"`python -m aero_lightning.data.prepare verify {folder}` and rebuild the split"
        )
    return urls


def shard_sample_counts(folder: str | os.PathLike) -> dict[str, int]:
    """Samples per shard as the split's manifest lists them, to account for samples a damaged shard loses.

    Args:
        folder: a prepared split folder.

    Returns:
        ``{shard url: num_samples}`` with the urls of :func:`resolve_split`; shards whose manifest entry has no
        ``num_samples`` are left out.

    Raises:
        FileNotFoundError: if the manifest is missing.
    """
    manifest = read_manifest(folder)
    urls = shard_urls(folder, manifest)
    return {
        url: int(entry["num_samples"])
        for url, entry in zip(urls, manifest["shards"])
        if entry.get("num_samples") is not None
    }


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed when initialised, else ``RANK`` / ``WORLD_SIZE``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_urls(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one DataLoader worker of one rank reads in a finite pass.

    Rank ``r`` takes every ``world_size``-th shard starting at ``r``, and worker ``w`` of that rank every
    ``num_workers``-th of those starting at ``w`` (webdataset's ``split_by_node`` then ``split_by_worker``), so the
    workers of all ranks read disjoint shard lists that together cover ``urls``.

    Args:
        urls: all shards, in order.
        rank, world_size: this process's rank and the number of ranks (``0 <= rank < world_size``).
        worker, num_workers: this DataLoader worker's id and the number of workers (1 without workers).

    Returns:
        ``list(urls)[rank::world_size][worker::num_workers]``.

    Raises:
        ValueError: if a rank or worker id is outside its range.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is outside [0, {num_workers})")
    return list(urls)[rank::world_size][worker::num_workers]


# ------------------------------------------------------------------------------------------------ samples


def iter_tar(url: str, rejects: RejectCounter) -> Iterator[dict]:
    """Samples of one WebDataset tar shard, grouped by key, without decoding.

    A shard that cannot be opened or is truncated ends early with the reason counted (``unreadable_shard`` /
    ``truncated_tar``); the samples read before the damage are still yielded.

    Args:
        url: local path of the shard.
        rejects: counter for skipped inputs.

    Yields:
        ``{"__key__": str, "__url__": url, <ext>: bytes, ...}`` per sample, in tar order.
    """
    current: dict | None = None
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                stem, _, ext = base.partition(".")
                key = posixpath.join(posixpath.dirname(member.name), stem)
                if current is None or current["__key__"] != key:
                    # the previous sample is whole once the next one starts: hand it out before reading on, so
                    # a shard cut inside this member's data does not take that sample with it
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = "truncated_tar" if os.path.exists(url) else "unreadable_shard"
        rejects.reject(reason, url, str(err))
        current = None  # the sample being read when the shard broke may be incomplete: it is not yielded
    if current is not None:
        yield current


def audio_members(raw: Mapping) -> list[str]:
    """The audio members of a raw sample, in clip order: one ``flac``/``wav``/``ogg``/``mp3`` member, or numbered
    members ``0.flac``, ``1.flac``, ... for a conversation with several clips; none for a text-only sample."""
    single = next((e for e in AUDIO_EXTENSIONS if e in raw), None)
    if single is not None:
        return [single]
    numbered = [(int(m.group(1)), k) for k in raw if isinstance(k, str) and (m := _NUMBERED_AUDIO.match(k))]
    return [k for _, k in sorted(numbered)]


def count_audio_parts(messages: Sequence[Mapping]) -> int:
    """Audio parts (``{"type": "audio"}``) in a conversation's messages."""
    return sum(
        1
        for m in messages
        if not isinstance(m.get("content"), str)
        for part in (m.get("content") or [])
        if isinstance(part, Mapping) and part.get("type") == "audio"
    )


def parse_sample(raw: Mapping, rejects: RejectCounter, max_duration_s: float | None = None) -> dict | None:
    """Check one raw shard sample's JSON and find its audio members, without decoding the audio.

    A sample holds as many audio members as its messages have audio parts: one (``<key>.flac``; ``duration_s`` is
    its length), several (``<key>.0.flac``, ``<key>.1.flac``, ...; ``audio_durations_s`` lists their lengths and
    ``duration_s`` is their sum) or none (a text-only conversation, ``task: text``; ``duration_s`` 0).

    Args:
        raw: a sample of :func:`iter_tar` (``__key__``, optionally ``__corpus__``, member bytes by extension).
        rejects: counter for skipped samples (``missing_member``, ``bad_json``, ``empty_text``, ``empty_audio``,
            ``too_long``).
        max_duration_s: skip samples whose JSON ``duration_s`` is longer (seconds), or None.

    Returns:
        ``{"key", "corpus", "task", "messages", "duration_s", "num_samples", "clip_samples", "audio", "shard"}``:
        ``shard`` is the shard's path (``raw["__url__"]``, None without one), ``corpus``
        is ``raw["__corpus__"]`` when set (the training mixture's name) else the JSON's ``corpus``; ``task`` the
        JSON's (``asr`` when absent); ``clip_samples`` each clip's ``round(seconds * 16000)``, ``num_samples``
        their sum; ``audio`` the clips' encoded bytes, in order. None if the sample is skipped.
    """
    key = raw["__key__"]
    label = sample_label(key, raw.get("__url__"))
    members = audio_members(raw)
    if "json" not in raw:
        rejects.reject("missing_member", label, f"has {sorted(k for k in raw if not k.startswith('__'))}")
        return None
    try:
        meta = json.loads(raw["json"])
        duration_s = float(meta["duration_s"])
        messages = meta["messages"]
        parts = count_audio_parts(messages)
        if parts > 1:
            clip_seconds = [float(d) for d in meta["audio_durations_s"]]
        else:
            clip_seconds = [duration_s] * parts
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        rejects.reject("bad_json", label, repr(err))
        return None
    if parts != len(members) or len(clip_seconds) != parts:
        rejects.reject(
            "missing_member",
            label,
            f"{parts} audio part(s) in the messages, audio members {members}, {len(clip_seconds)} duration(s)",
        )
        return None
    if not messages or not reference_text(messages).strip():
        rejects.reject("empty_text", label)
        return None
    clip_samples = [round(d * SAMPLE_RATE_HZ) for d in clip_seconds]
    if any(n < 1 for n in clip_samples):
        rejects.reject("empty_audio", label, f"clip durations {clip_seconds} s")
        return None
    if max_duration_s is not None and duration_s > max_duration_s:
        rejects.reject("too_long", label, f"{duration_s:.1f} s > max_duration_s={max_duration_s}")
        return None
    corpus = raw["__corpus__"] if "__corpus__" in raw else str(meta.get("corpus", ""))
    return {
        "key": key,
        "corpus": corpus,
        "task": str(meta.get("task") or "asr"),
        "messages": messages,
        "duration_s": duration_s,
        "num_samples": sum(clip_samples),
        "clip_samples": clip_samples,
        "audio": [raw[m] for m in members],
        "shard": raw.get("__url__"),
    }


def decode_waveform(
    item: Mapping, rejects: RejectCounter, audio_token_counter: Callable[[int], int] | None = None
) -> np.ndarray | None:
    """Decode the audio of a sample :func:`parse_sample` accepted, and check it.

    Args:
        item: ``{"key", "audio": bytes, "num_samples": int, "shard": path or None, ...}``.
        rejects: counter for skipped samples (``corrupt_audio``, ``sample_rate``, ``not_mono``, ``empty_audio``,
            ``duration_mismatch``); each is named ``<shard file>:<key>`` (:func:`sample_label`).
        audio_token_counter: clip samples -> audio tokens of the model; when given, a clip whose decoded length
            fills a different number of audio tokens than its JSON ``duration_s`` (``num_samples``) is skipped,
            because the sample was costed and planned with the JSON's count.

    Returns:
        ``(T,)`` float32 waveform at 16 kHz, or None if the sample is skipped.
    """
    key = sample_label(item["key"], item.get("shard"))
    try:
        waveform, sr = sf.read(io.BytesIO(item["audio"]), dtype="float32", always_2d=True)  # (T, C)
    except Exception as err:  # noqa: BLE001 - libsndfile raises several types for corrupt audio
        # libsndfile names the in-memory member by its object address, which says nothing to the reader
        message = _OBJECT_REPR.sub("the audio member", str(err))
        rejects.reject("corrupt_audio", key, f"{type(err).__name__}: {message}")
        return None
    if sr != SAMPLE_RATE_HZ:
        rejects.reject("sample_rate", key, f"{sr} Hz; shards must hold {SAMPLE_RATE_HZ} Hz (re-prepare)")
        return None
    if waveform.shape[1] != 1:
        rejects.reject("not_mono", key, f"{waveform.shape[1]} channels; shards must be mono (re-prepare)")
        return None
    if waveform.shape[0] == 0:
        rejects.reject("empty_audio", key)
        return None
    if audio_token_counter is not None and audio_token_counter(waveform.shape[0]) != audio_token_counter(
        item["num_samples"]
    ):
        rejects.reject(
            "duration_mismatch", key, f"{waveform.shape[0]} samples, json says {item['num_samples']}"
        )
        return None
    return waveform[:, 0]


def decode_clips(
    item: Mapping, rejects: RejectCounter, audio_token_counter: Callable[[int], int] | None = None
) -> list[np.ndarray] | None:
    """Decode and check every audio clip of a sample :func:`parse_sample` accepted (:func:`decode_waveform`).

    Returns:
        ``(T_i,)`` float32 waveforms at 16 kHz, in clip order (empty for a text-only sample), or None if a clip is
        unusable (the sample is then skipped and counted once).
    """
    clips = []
    for audio, num_samples in zip(item["audio"], item["clip_samples"]):
        wave = decode_waveform(
            {"key": item["key"], "audio": audio, "num_samples": num_samples, "shard": item.get("shard")},
            rejects,
            audio_token_counter,
        )
        if wave is None:
            return None
        clips.append(wave)
    return clips


def read_sample(raw: Mapping, rejects: RejectCounter, max_duration_s: float | None = None) -> dict | None:
    """One raw shard sample as the validation / generation collators take it (:func:`parse_sample` + decode).

    Args:
        raw: a sample of :func:`iter_tar`.
        rejects: counter for skipped samples.
        max_duration_s: skip longer samples (seconds, JSON ``duration_s``), or None.

    Returns:
        ``{"key": str, "waveforms": [(T_i,) float32 at 16 kHz, ...], "messages": list, "duration_s": seconds of
        audio, "corpus": str, "task": str}``, plus ``"waveform"`` (the clip) when there is exactly one; None if the
        sample is skipped.
    """
    item = parse_sample(raw, rejects, max_duration_s)
    if item is None:
        return None
    clips = decode_clips(item, rejects)
    if clips is None:
        return None
    sample = {
        "key": item["key"],
        "waveforms": clips,
        "messages": item["messages"],
        "duration_s": sum(c.shape[0] for c in clips) / SAMPLE_RATE_HZ,
        "corpus": item["corpus"],
        "task": item["task"],
    }
    if len(clips) == 1:
        sample["waveform"] = clips[0]
    return sample


def iter_samples(
    urls: Sequence[str],
    rejects: RejectCounter,
    max_duration_s: float | None = None,
    expected_samples: Mapping[str, int] | None = None,
) -> Iterator[dict]:
    """Finite pass over shards in order: every readable sample, decoded (:func:`read_sample`).

    Args:
        urls: shard paths, read in this order.
        rejects: counter for skipped samples and damaged shards.
        max_duration_s: skip longer samples (seconds), or None.
        expected_samples: ``{url: samples the manifest lists}`` (:func:`shard_sample_counts`); a shard that yields
            fewer (it is unreadable or truncated) counts the difference as ``missing_samples``.

    Yields:
        :func:`read_sample` dicts, in shard order then tar order.
    """
    for url in urls:
        read = 0
        for raw in iter_tar(url, rejects):
            read += 1
            sample = read_sample(raw, rejects, max_duration_s)
            if sample is not None:
                yield sample
        expected = (expected_samples or {}).get(url)
        if expected is not None and read < expected:
            rejects.reject(
                "missing_samples",
                url,
                f"read {read} of the {expected} samples the manifest lists",
                count=expected - read,
            )


def balanced_pass(
    urls: Sequence[str],
    rank: int,
    world_size: int,
    counts: Mapping[str, int],
    rejects: RejectCounter,
    max_duration_s: float | None = None,
) -> Iterator[dict]:
    """This rank's share of a finite pass, padded so that every rank yields the same number of samples.

    Sharded strategies (FSDP2, DeepSpeed ZeRO-3) all-gather parameters in every forward, so all ranks must run the
    same number of evaluation batches. Each rank reads its shards (:func:`split_urls`), then repeats samples it
    already yielded until it reaches the largest share in the manifest, ``max over ranks of its shards' samples``;
    every rank computes that number from the manifest alone, with no collective. A rank without a shard reads the
    shard ``rank % len(urls)`` and yields only repeats. Samples lost to damage are made up by repeats too.

    Args:
        urls: all shards of the split, in order.
        rank, world_size: this process's rank and the number of ranks.
        counts: ``{url: num_samples}`` from the manifest (:func:`shard_sample_counts`), for every url.
        rejects: counter for skipped samples and damaged shards (repeats count nothing).
        max_duration_s: skip longer samples (seconds), or None.

    Yields:
        :func:`read_sample` dicts; repeats carry ``"duplicate": True`` (no loss, no score: the consumer drops them,
        e.g. by key).

    Raises:
        ValueError: if a url has no count in ``counts``.
    """
    missing = [u for u in urls if u not in counts]
    if missing:
        raise ValueError(
            f"balanced evaluation needs the manifest's sample count of every shard; none for {missing[0]}"
        )
    target = max(sum(counts[u] for u in split_urls(urls, r, world_size, 0, 1)) for r in range(world_size))
    own = split_urls(urls, rank, world_size, 0, 1)
    seen: list[dict] = []
    for sample in iter_samples(own, rejects, max_duration_s, counts):
        seen.append(sample)
        yield sample
    yielded = len(seen)
    if not seen and target:  # no shard of its own (or all of it unreadable): repeat another rank's samples
        seen = list(iter_samples([urls[rank % len(urls)]], RejectCounter(), max_duration_s))
        if not seen:
            raise RuntimeError(f"balanced evaluation: no readable sample in {urls[rank % len(urls)]}")
    for i in range(max(0, target - yielded)):
        yield seen[i % len(seen)] | {"duplicate": True}


class ShardPass(IterableDataset):
    """Finite, ordered pass over shards for validation and test, split by rank x worker (:func:`split_urls`).

    Use with a DataLoader that batches (``batch_size=N`` and a collator such as
    :class:`~aero_lightning.data.datamodule.AsrCollator`).

    Args:
        urls: shard paths of the split (:func:`resolve_split`).
        max_duration_s: skip longer samples (seconds), or None.
        expected_samples: ``{url: num_samples}`` from the manifest (:func:`shard_sample_counts`), to count samples
            a damaged shard loses; None to count only the damaged shard.
        balanced: every rank yields the same number of samples (:func:`balanced_pass`; needs ``expected_samples``
            for every shard and no DataLoader worker processes), for strategies that shard parameters.

    Attributes:
        rejects: skipped samples and damaged shards by reason, accumulated over passes. With DataLoader worker
            processes each worker counts in its own copy (and logs it); this one then stays empty.

    Raises:
        ValueError: from iteration, for a balanced pass in a DataLoader worker process.
    """

    def __init__(
        self,
        urls: Sequence[str],
        max_duration_s: float | None = None,
        expected_samples: Mapping[str, int] | None = None,
        balanced: bool = False,
    ):
        super().__init__()
        self.urls = list(urls)
        self.max_duration_s = max_duration_s
        self.expected_samples = dict(expected_samples or {})
        self.balanced = bool(balanced)
        self.rejects = RejectCounter()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = dist_rank_world()
        if self.balanced:
            if num_workers > 1:
                raise ValueError("a balanced evaluation pass runs in the main process: use num_workers=0")
            return balanced_pass(
                self.urls, rank, world, self.expected_samples, self.rejects, self.max_duration_s
            )
        urls = split_urls(self.urls, rank, world, worker, num_workers)
        return iter_samples(urls, self.rejects, self.max_duration_s, self.expected_samples)
