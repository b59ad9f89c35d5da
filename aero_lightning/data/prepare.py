"""Prepare a public corpus into WebDataset shards + ``manifest.json``.

CLI (``key=value`` arguments, any order; or ``verify`` and split folders)::

    python -m aero_lightning.data.prepare verify DIR [DIR ...]
    python -m aero_lightning.data.prepare corpus=NAME out=DIR [source=PATH_OR_HF_ID] [split=train]
        [shard_size=1000] [workers=N] [limit=N] [prompt=TEXT] [max_duration_s=SECONDS]
        [hf_split=EXPR] [hf_config=NAME] [revision=REV] [metadata=GLOB]
        [audio_column=COL] [text_column=COL] [answer_column=COL] [question_column=COL] [id_column=COL]
        [progress=true|false]

``corpus`` is a name from :mod:`aero_lightning.data.corpora`. ``source`` is one of

- a folder in the corpus's official layout (the registry's ``folder_layout``), read by
  :mod:`aero_lightning.data.readers`: LibriSpeech (see :data:`~aero_lightning.data.readers.FOLDER_READERS`), e.g.
  ``LibriSpeech/train-clean-100`` or ``LibriSpeech`` for all its subsets, or a *table* layout (the registry's
  ``folder_table``: metadata CSV/JSON + audio files, e.g. the AudioCaps folder holding ``train.csv`` and the
  downloaded clips), read by :func:`~aero_lightning.data.readers.read_table_folder` for ``split``;
  ``metadata=GLOB`` replaces the registry's metadata file of that split and the column overrides replace
  its columns;
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose split is
  ``hf_split``, else ``split``, else the registry's mapping of ``split``);
- an HF hub dataset id (default: the registry's ``hf_id``), loaded with
  ``datasets.load_dataset(id, hf_config, split=hf_split, revision=revision)`` where ``hf_split`` defaults to the
  registry's mapping of ``split``.

Audio columns are read with ``Audio(decode=False)`` and decoded here with soundfile (``datasets>=4`` would
need torchcodec), then averaged to mono and resampled to 16 kHz with soxr (``HQ``). Column names come from the
registry and can be overridden per field.

Output, in ``out`` (one folder per corpus split)::

    <corpus>-<split>-000000.tar         # inputs [0, shard_size) of the ordered input list, minus rejects
    <corpus>-<split>-000000.stats.json  # that shard's samples, per-sample durations, rejects, build params
    ...
    manifest.json                       # shards, counts, hours, duration histogram, all rejects

Determinism: inputs are ordered (folder: by utterance key; HF: dataset order, then ``limit`` keeps the first
``N``) and cut into consecutive chunks of ``shard_size``; chunk ``i`` becomes shard ``i``, written by one worker
through a hidden ``.<name>.partial/`` folder and :func:`os.replace`, so shard bytes do not depend on ``workers``.
A chunk whose inputs are all rejected gets a stats file but no tar. Each stats file and the manifest record the
tar's sample count, size and SHA-256. On a re-run, shards whose stats file exists with identical build parameters
and whose tar still has the recorded size and SHA-256 are skipped; a damaged tar (cut short, changed) is rebuilt;
the manifest is rebuilt from all stats files. A crash therefore loses at most the shards in flight.

``python -m aero_lightning.data.prepare verify DIR [DIR ...]`` checks prepared splits without rebuilding anything
(:func:`verify_command`): every shard the manifest lists is present with its size and SHA-256 (older manifests
without them: read to the end and its samples counted); it prints ok or the damaged shards with their reason and
exits 1 if any is damaged.

Bad inputs never stop the run; each is skipped and listed in the manifest with one of the reasons in
:data:`aero_lightning.data.rejects.REJECT_REASONS` (the table every reader of the project shares).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from aero_lightning.cli import run_key_value_cli
from aero_lightning.data.corpora import COLUMN_FIELDS, CorpusSpec, FolderTable, get_corpus
from aero_lightning.data.readers import KEY_UNSAFE, FolderInput, as_text, read_folder
from aero_lightning.data.rejects import check_reason
from aero_lightning.data.shards import (
    MANIFEST_NAME,
    SAMPLE_RATE_HZ,
    ShardWriter,
    asr_sample_json,
    build_manifest,
    check_shard,
    decode_audio,
    encode_flac,
    file_sha256,
    verify_split,
    write_manifest,
)
from aero_lightning.errors import UserFileNotFoundError, UserValueError
from aero_lightning.progress import Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the bytes written for the same input change; part of every shard's build parameters."""

STATS_SUFFIX = ".stats.json"
RESAMPLE_QUALITY = "HQ"
"""soxr quality recipe used to resample to 16 kHz."""

_MAX_LOGGED_REJECTS = 20
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# ------------------------------------------------------------------------------------- HF datasets


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _label_names(feature: Any) -> list[str] | None:
    """Class names of a ``ClassLabel`` feature or of a list of them, else ``None``."""
    from datasets import ClassLabel

    if isinstance(feature, ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    return None


def _select_split(dataset_dict: Mapping[str, Any], spec: CorpusSpec, split: str, hf_split: str | None) -> str:
    candidates = [hf_split] if hf_split else [split, spec.hf_splits.get(split)]
    for name in candidates:
        if name and name in dataset_dict:
            return name
    raise UserValueError(
        f"the saved DatasetDict has splits {sorted(dataset_dict)}, none of {[c for c in candidates if c]}; "
        "pass hf_split=NAME"
    )


def _load_hf_dataset(
    spec: CorpusSpec,
    source: str,
    split: str,
    hf_split: str | None,
    hf_config: str | None,
    revision: str | None,
) -> tuple[Any, str, dict[str, Any]]:
    """Load the dataset of ``source``; returns ``(dataset, provenance label, build-param fields)``."""
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        chosen = None
        if isinstance(loaded, datasets.DatasetDict):
            chosen = _select_split(loaded, spec, split, hf_split)
            loaded = loaded[chosen]
        label = f"{path.name}:{chosen}" if chosen else path.name
        return loaded, label, {"kind": "saved", "path": str(path.resolve()), "hf_split": chosen}
    config = hf_config if hf_config is not None else spec.hf_config
    expr = hf_split or spec.hf_splits.get(split, split)
    log.info("loading %s (config %s, split %s, revision %s)", source, config, expr, revision)
    loaded = datasets.load_dataset(source, config, split=expr, revision=revision)
    label = f"{source}:{config}:{expr}" if config else f"{source}:{expr}"
    return (
        loaded,
        label,
        {"kind": "hub", "id": source, "config": config, "hf_split": expr, "revision": revision},
    )


def _prepare_hf_columns(dataset: Any, spec: CorpusSpec, columns: Mapping[str, str], limit: int | None) -> Any:
    """Keep the used columns, cast the audio column to ``Audio(decode=False)`` and apply ``limit``."""
    from datasets import Audio

    available = list(dataset.column_names)
    required = ["audio", "text"] + (["question"] if spec.task == "aqa" else [])
    missing = [f"{f}={columns.get(f)!r}" for f in required if columns.get(f) not in available]
    if missing:
        raise UserValueError(
            f"dataset columns {available} lack the required {', '.join(missing)}; map them with "
            "audio_column= / text_column= / question_column="
        )
    used = [columns[f] for f in COLUMN_FIELDS if f in columns and columns[f] in available]
    for f in ("question", "id"):
        if f in columns and columns[f] not in available:
            log.warning("column %r (%s) not in the dataset %s; ignoring it", columns[f], f, available)
    dataset = dataset.select_columns(list(dict.fromkeys(used)))
    if isinstance(dataset.features[columns["audio"]], Audio):
        dataset = dataset.cast_column(columns["audio"], Audio(decode=False))
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset


def _hf_audio(value: Any) -> tuple[np.ndarray, int]:
    """Decode an undecoded HF audio value: ``{"bytes", "path"}``, ``{"array", "sampling_rate"}``, bytes, path."""
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            wave = np.asarray(value["array"], dtype=np.float32)
            if wave.ndim == 2:  # (C, T) or (T, C): average the shorter axis (channels)
                wave = wave.mean(axis=int(np.argmin(wave.shape)), dtype=np.float32)
            return wave, int(value["sampling_rate"])
        if value.get("bytes"):
            return decode_audio(value["bytes"])
        if value.get("path"):
            return decode_audio(Path(value["path"]).read_bytes())
    elif isinstance(value, (bytes, bytearray)):
        return decode_audio(bytes(value))
    elif isinstance(value, (str, os.PathLike)):
        return decode_audio(Path(value).read_bytes())
    raise ValueError(f"no audio bytes, path or array in {type(value).__name__} value")


# ------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class _Context:
    """Everything a worker needs besides its job; sent once per worker process."""

    corpus: str
    task: str
    language: str
    out_dir: str
    prefix: str
    prompts: tuple[str, ...]
    max_duration_s: float | None
    params: dict[str, Any]
    source_label: str
    columns: dict[str, str] = field(default_factory=dict)
    label_names: list[str] | None = None


@dataclass(frozen=True)
class _Job:
    index: int
    start: int
    stop: int
    folder_inputs: tuple[FolderInput, ...] | None = None  # None: rows come from the worker's HF dataset


@dataclass
class _Outcome:
    key: str
    flac: bytes | None = None
    record: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""


_CONTEXT: _Context | None = None
_DATASET: Any = None


def _init_worker(context: _Context, dataset: Any) -> None:
    global _CONTEXT, _DATASET
    _CONTEXT, _DATASET = context, dataset


def _shard_stem(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


def _convert(
    ctx: _Context,
    *,
    key: str,
    index: int,
    source: str,
    load: Callable[[], tuple[np.ndarray, int]],
    text: str | None,
    question: str | None,
) -> _Outcome:
    """Turn one input into FLAC bytes + JSON record, or a rejection; never raises for bad data."""
    if text is None:
        return _Outcome(key, reason="missing_transcript", detail=f"no text for {source}")
    text = text.strip()
    if not text:
        return _Outcome(key, reason="empty_text", detail=f"empty text for {source}")
    question = question.strip() if question is not None else None
    if ctx.task == "aqa" and not question:
        return _Outcome(key, reason="empty_question", detail=f"no question for {source}")
    try:
        wave, rate = load()  # (T,), Hz
    except Exception as err:  # noqa: BLE001 - any decoder failure is a rejection
        message = _OBJECT_REPR.sub("<audio>", str(err))  # libsndfile names the BytesIO object by address
        return _Outcome(key, reason="unreadable_audio", detail=f"{source}: {type(err).__name__}: {message}")
    if not rate > 0:
        return _Outcome(key, reason="unreadable_audio", detail=f"{source}: sample rate {rate} Hz")
    if wave.size == 0:
        return _Outcome(key, reason="empty_audio", detail=f"{source}: 0 samples")
    if not np.all(np.isfinite(wave)):
        return _Outcome(key, reason="non_finite_audio", detail=f"{source}: NaN or inf samples")
    if ctx.max_duration_s is not None and wave.size / rate > ctx.max_duration_s:
        return _Outcome(
            key, reason="too_long", detail=f"{source}: {wave.size / rate:.3f} s > {ctx.max_duration_s} s"
        )
    if rate != SAMPLE_RATE_HZ:
        wave = soxr.resample(wave, rate, SAMPLE_RATE_HZ, quality=RESAMPLE_QUALITY)  # (T * 16000 / rate,)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.size == 0:
        return _Outcome(key, reason="empty_audio", detail=f"{source}: 0 samples after resampling")
    try:
        flac = encode_flac(wave, SAMPLE_RATE_HZ)
    except Exception as err:  # noqa: BLE001
        return _Outcome(key, reason="encode_failed", detail=f"{source}: {type(err).__name__}: {err}")

    prompt = ctx.prompts[index % len(ctx.prompts)]
    extra: dict[str, Any] = {"source_sample_rate_hz": int(rate)}
    if ctx.task == "aqa":
        prompt = prompt.replace("{question}", question or "")
        extra["question"] = question
    elif ctx.task == "instruct" and question:
        extra["instruction_text"] = question
    record = asr_sample_json(
        corpus=ctx.corpus,
        text=text,
        duration_s=wave.size / SAMPLE_RATE_HZ,
        source=source,
        language=ctx.language,
        prompt=prompt,
        **extra,
    )
    record["task"] = ctx.task
    if not prompt:  # the audio alone is the instruction
        user = record["messages"][0]
        user["content"] = [part for part in user["content"] if part.get("type") != "text"]
    return _Outcome(key, flac=flac, record=record)


def _folder_outcomes(ctx: _Context, job: _Job) -> Iterator[_Outcome]:
    assert job.folder_inputs is not None
    for offset, item in enumerate(job.folder_inputs):
        if item.reject is not None:
            yield _Outcome(item.key, reason=item.reject, detail=item.detail)
            continue
        if item.audio_path is None:
            yield _Outcome(item.key, reason="missing_audio", detail=f"{item.source}: no audio for {item.key}")
            continue
        path = item.audio_path
        yield _convert(
            ctx,
            key=item.key,
            index=job.start + offset,
            source=item.source,
            load=lambda path=path: decode_audio(Path(path).read_bytes()),
            text=item.text,
            question=item.question,
        )


def _hf_outcomes(ctx: _Context, job: _Job, dataset: Any) -> Iterator[_Outcome]:
    cols = ctx.columns
    for index in range(job.start, job.stop):
        fallback_key = f"{index:09d}"
        try:
            row = dataset[index]
        except Exception as err:  # noqa: BLE001
            yield _Outcome(
                fallback_key, reason="unreadable_row", detail=f"row {index}: {type(err).__name__}: {err}"
            )
            continue
        raw_id = row.get(cols["id"]) if "id" in cols else None
        key = KEY_UNSAFE.sub("_", str(raw_id)).strip("_") if raw_id not in (None, "") else ""
        question = row.get(cols["question"]) if "question" in cols else None
        yield _convert(
            ctx,
            key=key or fallback_key,
            index=index,
            source=f"{ctx.source_label}#{index}",
            load=lambda value=row[cols["audio"]]: _hf_audio(value),
            text=as_text(row[cols["text"]], ctx.label_names, ctx.task),
            question=None if question is None else str(question),
        )


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _run_job(job: _Job) -> dict[str, Any]:
    """Build shard ``job.index`` (tar via a hidden partial folder, then its stats file); returns the stats."""
    ctx = _CONTEXT
    assert ctx is not None, "worker not initialised"
    out = Path(ctx.out_dir)
    stem = _shard_stem(ctx.prefix, job.index)
    name = f"{stem}.tar"
    partial = out / f".{stem}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    outcomes = (
        _folder_outcomes(ctx, job) if job.folder_inputs is not None else _hf_outcomes(ctx, job, _DATASET)
    )
    rejected: list[dict[str, str]] = []
    keys: list[str] = []
    with ShardWriter(partial, stem, max_samples_per_shard=max(1, job.stop - job.start)) as writer:
        for outcome in outcomes:
            if outcome.flac is not None and outcome.record is not None:
                try:
                    writer.write(outcome.key, outcome.flac, outcome.record)
                    keys.append(outcome.key)
                    continue
                except ValueError as err:  # a repeated key; nothing was written
                    outcome.reason, outcome.detail = "duplicate_key", str(err)
            rejected.append(
                {"key": outcome.key, "reason": check_reason(str(outcome.reason)), "detail": outcome.detail}
            )
    if writer.shards:
        os.replace(partial / f"{stem}-000000.tar", out / name)
    else:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    stats = {
        "format_version": FORMAT_VERSION,
        "index": job.index,
        "shard": name if writer.shards else None,
        "input_start": job.start,
        "input_stop": job.stop,
        "num_samples": writer.num_samples,
        "duration_s": writer.shards[0]["duration_s"] if writer.shards else 0.0,
        "size_bytes": writer.shards[0]["size_bytes"] if writer.shards else None,
        "sha256": writer.shards[0]["sha256"] if writer.shards else None,
        "keys": keys,
        "durations_s": list(writer.durations_s),
        "rejected": rejected,
        "build_params": ctx.params,
    }
    _write_json_atomic(out / f"{stem}{STATS_SUFFIX}", stats)
    return stats


# ------------------------------------------------------------------------------------------- driver


def _finished_stats(out: Path, prefix: str, index: int, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Stats of shard ``index`` if it was built with ``params`` and its tar is sound, else ``None`` (rebuild it).

    A finished tar is checked against its stats file (:func:`~aero_lightning.data.shards.check_shard`): size and
    SHA-256, or, for stats written before those were recorded, its samples counted to the end of the tar (and the
    size and hash then added to the stats). A damaged tar (truncated by a copy, a full disk, a crash of the
    storage) is logged and rebuilt instead of being taken as finished.
    """
    stem = _shard_stem(prefix, index)
    path = out / f"{stem}{STATS_SUFFIX}"
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stats.get("build_params") != params or stats.get("index") != index:
        return None
    if stats.get("num_samples", 0) == 0:
        return stats
    tar = out / f"{stem}.tar"
    damage = check_shard(tar, int(stats["num_samples"]), stats.get("size_bytes"), stats.get("sha256"))
    if damage is not None:
        log.warning("%s is damaged (%s); rebuilding it", tar.name, damage)
        return None
    if stats.get("sha256") is None:
        stats.update(size_bytes=tar.stat().st_size, sha256=file_sha256(tar))
        _write_json_atomic(path, stats)
    return stats


def _remove_stale(out: Path, prefix: str, num_shards: int) -> None:
    """Remove the manifest, partial folders, temp files and shards beyond ``num_shards`` of this prefix."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for path in sorted(out.glob(f".{prefix}-*.partial")):
        shutil.rmtree(path, ignore_errors=True)
    ours = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})(?:\.tar|{re.escape(STATS_SUFFIX)})(\.tmp)?$")
    removed = 0
    for path in sorted(out.glob(f"{prefix}-*")):
        match = ours.match(path.name)
        if match is not None and (match.group(2) is not None or int(match.group(1)) >= num_shards):
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d stale shard/stats/temp files of %s", removed, prefix)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _sha256(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _input_line(item: FolderInput) -> str:
    """What identifies a folder input in the build parameters (LibriSpeech lines predate the extra fields)."""
    line = f"{item.key}\t{item.source}\t{item.text}"
    if item.question is not None or item.reject is not None:
        line += f"\t{item.question}\t{item.reject}"
    return line


def _override_table(
    table: FolderTable, split: str, columns: Mapping[str, str], metadata: str | None
) -> FolderTable:
    """``table`` with the CLI's column overrides and ``split``'s metadata glob replaced."""
    changes: dict[str, Any] = {}
    if "audio" in columns:
        changes["audio"] = (f"{{{columns['audio']}}}",)
    if "text" in columns:
        changes["text"] = (columns["text"],)
    if "question" in columns:
        changes["question"] = columns["question"]
    if "id" in columns:
        changes["key"] = f"{{{columns['id']}}}"
    if metadata is not None:
        changes["metadata"] = {**table.metadata, split: metadata}
    return dataclasses.replace(table, **changes)


def prepare_corpus(
    corpus: str,
    out_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    *,
    split: str = "train",
    hf_split: str | None = None,
    hf_config: str | None = None,
    revision: str | None = None,
    shard_size: int = 1000,
    workers: int | None = None,
    limit: int | None = None,
    prompt: str | None = None,
    max_duration_s: float | None = None,
    columns: Mapping[str, str] | None = None,
    metadata: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert one split of a registered corpus into WebDataset shards and a manifest.

    Args:
        corpus: registry name (:data:`aero_lightning.data.corpora.CORPORA`).
        out_dir: output folder of this split; created if missing.
        source: official-layout folder, ``save_to_disk`` folder or hub id; ``None`` for the registry's
            ``hf_id``.
        split: our split name; part of shard names and the key into the registry's ``hf_splits``.
        hf_split: HF split (expression) to read; default: the registry's mapping of ``split``.
        hf_config: hub dataset config; default: the registry's ``hf_config``.
        revision: hub revision (branch, tag or commit), e.g. ``"refs/convert/parquet"``.
        shard_size: inputs per shard (>= 1); rejected inputs leave their shard smaller.
        workers: worker processes; ``0`` or ``1`` runs in this process; default ``min(4, cpu count)``.
        limit: use only the first ``limit`` inputs.
        prompt: user instruction for every sample instead of the registry's rotating ``prompts`` (``aqa``:
            ``{question}`` is replaced by the question; ``instruct``: ``""`` means audio only).
        max_duration_s: reject inputs longer than this many seconds (``"too_long"``).
        columns: overrides of the registry's column mapping (``audio``, ``text``, ``question``, ``id``); for a
            table folder layout they replace its audio template, text column(s), question column and key.
        metadata: table folder layouts: glob (relative to ``source``) of the metadata file(s) of ``split``,
            replacing the registry's (which may then lack ``split``).
        progress: a progress bar on a terminal, else a progress log line every 30 s (advances per finished shard).

    Returns:
        The manifest dict written to ``out_dir/manifest.json``, with the extra fields ``task``, ``domain``
        and ``build_params``.

    Raises:
        KeyError: for an unknown corpus.
        ValueError: for invalid arguments, a corpus without a usable source, or missing dataset columns.
        NotImplementedError: for an official folder layout without a reader.
        FileNotFoundError: if a local ``source`` path does not exist or is not in the expected layout.
    """
    spec = get_corpus(corpus)
    if shard_size < 1:
        raise UserValueError(f"shard_size must be >= 1, got {shard_size}")
    if limit is not None and limit < 0:
        raise UserValueError(f"limit must be >= 0, got {limit}")
    if max_duration_s is not None and not max_duration_s > 0:
        raise UserValueError(f"max_duration_s must be > 0, got {max_duration_s}")
    workers = _default_workers() if workers is None else int(workers)
    if workers < 0:
        raise UserValueError(f"workers must be >= 0, got {workers}")
    unknown = sorted(set(columns or {}) - set(COLUMN_FIELDS))
    if unknown:
        raise UserValueError(f"unknown column fields {unknown}; allowed: {COLUMN_FIELDS}")
    if prompt is not None and spec.task == "aqa" and "{question}" not in prompt:
        raise UserValueError("an aqa prompt must contain '{question}'")
    if prompt is not None and not prompt.strip() and spec.task != "instruct":
        raise UserValueError("only instruct corpora accept an empty prompt")
    if not split or KEY_UNSAFE.search(split):
        raise UserValueError(f"split must match [A-Za-z0-9_-]+, got {split!r}")
    start_time = time.perf_counter()
    out = Path(out_dir)
    prefix = f"{spec.name}-{split}"

    # ---- inputs
    if source is None:
        if not spec.hf_id:
            raise UserValueError(
                f"corpus {spec.name!r} has no HF id; pass source= a folder in its {spec.folder_layout!r} layout"
            )
        source = spec.hf_id
    source_str = str(source)
    source_path = Path(source_str).expanduser()
    dataset = None
    folder_inputs: list[FolderInput] | None = None
    label_names = None
    col_map = {**spec.columns, **(columns or {})}
    if metadata is not None and spec.folder_table is None:
        raise UserValueError(f"metadata= applies to table folder layouts; corpus {spec.name!r} has none")
    if source_path.is_dir() and not _is_saved_dataset(source_path):
        if spec.folder_table is not None and (columns or metadata is not None):
            spec = dataclasses.replace(
                spec, folder_table=_override_table(spec.folder_table, split, columns or {}, metadata)
            )
        folder_inputs = read_folder(spec, source_path, split)
        if limit is not None:
            folder_inputs = folder_inputs[:limit]
        num_inputs = len(folder_inputs)
        source_label = source_path.name
        source_params: dict[str, Any] = {
            "kind": "folder",
            "layout": spec.folder_layout,
            "path": str(source_path.resolve()),
            "inputs_sha256": _sha256([_input_line(i) for i in folder_inputs]),
        }
        if spec.folder_table is not None:
            source_params["table"] = dataclasses.asdict(spec.folder_table)
    else:
        if source_str.startswith(("/", ".", "~")) and not source_path.exists():
            raise UserFileNotFoundError(f"source folder {source_path} does not exist")
        loaded, source_label, source_params = _load_hf_dataset(
            spec, source_str, split, hf_split, hf_config, revision
        )
        source_params["fingerprint"] = getattr(loaded, "_fingerprint", None)
        dataset = _prepare_hf_columns(loaded, spec, col_map, limit)
        label_names = _label_names(dataset.features[col_map["text"]])
        num_inputs = len(dataset)
    num_shards = math.ceil(num_inputs / shard_size)
    prompts = (prompt,) if prompt is not None else spec.prompts
    params = json.loads(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "corpus": spec.name,
                "task": spec.task,
                "split": split,
                "source": source_params,
                "columns": col_map if dataset is not None else {},
                "num_inputs": num_inputs,
                "limit": limit,
                "shard_size": int(shard_size),
                "prompts": list(prompts),
                "max_duration_s": max_duration_s,
                "sample_rate": SAMPLE_RATE_HZ,
                "resample_quality": RESAMPLE_QUALITY,
            },
            sort_keys=True,
        )
    )
    context = _Context(
        corpus=spec.name,
        task=spec.task,
        language=spec.language,
        out_dir=str(out),
        prefix=prefix,
        prompts=tuple(prompts),
        max_duration_s=max_duration_s,
        params=params,
        source_label=source_label,
        columns=dict(col_map),
        label_names=label_names,
    )

    # ---- resume bookkeeping
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, prefix, num_shards)
    stats_by_index: dict[int, dict[str, Any]] = {}
    jobs: list[_Job] = []
    for index in range(num_shards):
        start, stop = index * shard_size, min((index + 1) * shard_size, num_inputs)
        done = _finished_stats(out, prefix, index, params)
        if done is not None:
            stats_by_index[index] = done
            continue
        chunk = tuple(folder_inputs[start:stop]) if folder_inputs is not None else None
        jobs.append(_Job(index, start, stop, chunk))
    log.info(
        "%s/%s: %d inputs -> %d shards of <= %d; %d already finished (skipped), %d to build with %d worker(s)",
        spec.name, split, num_inputs, num_shards, shard_size, len(stats_by_index), len(jobs),
        min(max(workers, 1), max(len(jobs), 1)),
    )  # fmt: skip

    # ---- build
    new_rejects: list[dict[str, str]] = []
    bar = Progress(
        sum(j.stop - j.start for j in jobs), f"{spec.name}/{split}", unit="input", enabled=progress
    )
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(context, dataset)
            try:
                for job in jobs:
                    stats_by_index[job.index] = _run_job(job)
                    new_rejects.extend(stats_by_index[job.index]["rejected"])
                    bar.update(job.stop - job.start)
            finally:
                _init_worker(None, None)  # type: ignore[arg-type]
        else:
            mp_context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
            with ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)),
                mp_context=mp_context,
                initializer=_init_worker,
                initargs=(context, dataset),
            ) as pool:
                futures = {pool.submit(_run_job, job): job for job in jobs}
                for future in as_completed(futures):
                    job = futures[future]
                    stats_by_index[job.index] = future.result()
                    new_rejects.extend(stats_by_index[job.index]["rejected"])
                    bar.update(job.stop - job.start)
    for reject in new_rejects[:_MAX_LOGGED_REJECTS]:
        log.warning("skipped %s (%s): %s", reject["key"], reject["reason"], reject["detail"])
    if len(new_rejects) > _MAX_LOGGED_REJECTS:
        log.warning(
            "... and %d more rejected inputs (see manifest.json)", len(new_rejects) - _MAX_LOGGED_REJECTS
        )

    # ---- manifest from all stats, in shard order
    ordered = [stats_by_index[i] for i in range(num_shards)]
    manifest = build_manifest(
        corpus=spec.name,
        split=split,
        shards=[
            {
                "name": s["shard"],
                "num_samples": s["num_samples"],
                "duration_s": s["duration_s"],
                "size_bytes": s.get("size_bytes"),
                "sha256": s.get("sha256"),
            }
            for s in ordered
            if s["num_samples"] > 0
        ],
        durations_s=[d for s in ordered for d in s["durations_s"]],
        rejected=[r for s in ordered for r in s["rejected"]],
        task=spec.task,
        domain=spec.domain,
        build_params=params,
    )
    path = write_manifest(out, manifest)
    log.info(
        "%s/%s: %d samples, %.3f h in %d shards, rejected %s; %s (%.1f s)",
        spec.name, split, manifest["num_samples"], manifest["hours"], len(manifest["shards"]),
        manifest["rejected_counts"] or "none", path, time.perf_counter() - start_time,
    )  # fmt: skip
    return manifest


# ---------------------------------------------------------------------------------------------- CLI

USAGE = """\
usage: python -m aero_lightning.data.prepare corpus=NAME out=DIR [key=value ...]
       python -m aero_lightning.data.prepare verify DIR [DIR ...]   check prepared splits (exit 1 if damaged)

  corpus=NAME            registry name (aero_lightning.data.corpora), required
  out=DIR                output folder of this split, required
  source=PATH_OR_ID      official-layout folder, save_to_disk folder or HF hub id (default: registry hf_id)
  split=train            our split name (shard names, registry hf_splits key)
  hf_split=EXPR          HF split to read (default: registry mapping of split)
  hf_config=NAME         HF config (default: registry hf_config)
  revision=REV           HF revision, e.g. refs/convert/parquet
  metadata=GLOB          table folder layouts: metadata file(s) of this split (default: registry)
  shard_size=1000        inputs per shard
  workers=N              worker processes (default: min(4, cpu count); 0/1 = in process)
  limit=N                only the first N inputs
  prompt=TEXT            user instruction for every sample (default: registry prompts)
  max_duration_s=S       reject inputs longer than S seconds
  audio_column= text_column= answer_column= question_column= id_column=   column overrides
  progress=true|false    progress bar (default: true)
"""

_INT_KEYS = ("shard_size", "workers", "limit")
_STR_KEYS = ("corpus", "out", "source", "split", "hf_split", "hf_config", "revision", "prompt", "metadata")
_COLUMN_KEYS = {
    "audio_column": "audio",
    "text_column": "text",
    "answer_column": "text",
    "question_column": "question",
    "id_column": "id",
}


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` arguments into :func:`prepare_corpus` keyword arguments.

    Args:
        argv: the arguments, e.g. ``["corpus=librispeech", "out=/data/ls", "workers=8"]``.

    Returns:
        Keyword arguments for :func:`prepare_corpus` (``out`` becomes ``out_dir``; column keys are gathered
        into ``columns``).

    Raises:
        ValueError: on a malformed argument, an unknown or repeated key, a bad number, or a missing
            ``corpus``/``out``.
    """
    kwargs: dict[str, Any] = {}
    columns: dict[str, str] = {}
    seen: set[str] = set()
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {arg!r}")
        if key in seen:
            raise ValueError(f"{key} given twice")
        seen.add(key)
        try:
            if key in _INT_KEYS:
                kwargs[key] = int(value)
            elif key == "max_duration_s":
                kwargs[key] = float(value)
            elif key == "progress":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                kwargs[key] = value.lower() in ("true", "1", "yes")
            elif key in _STR_KEYS:
                kwargs[key] = value
            elif key in _COLUMN_KEYS:
                if _COLUMN_KEYS[key] in columns:
                    raise ValueError("text_column and answer_column both given")
                columns[_COLUMN_KEYS[key]] = value
            else:
                known = [*_STR_KEYS, *_INT_KEYS, "max_duration_s", "progress", *_COLUMN_KEYS]
                raise ValueError(f"unknown key {key!r}; known keys: {', '.join(known)}")
        except ValueError as err:
            if str(err).startswith(("unknown key", "text_column")):
                raise
            raise ValueError(f"bad value for {key}: {value!r}") from None
    for required in ("corpus", "out"):
        if required not in kwargs:
            raise ValueError(f"{required}= is required")
    kwargs["out_dir"] = kwargs.pop("out")
    if columns:
        kwargs["columns"] = columns
    return kwargs


VERIFY_USAGE = """\
usage: python -m aero_lightning.data.prepare verify DIR [DIR ...]

  DIR   a prepared split folder (with manifest.json), or a folder whose subfolders are splits
        (e.g. data_cache/librispeech for all its splits)

Checks every shard the manifest lists: present, its size and SHA-256 as recorded (manifests without them: read to
the end and its samples counted). Prints one line per split, and one per damaged shard with the reason.
Exit status: 0 all sound, 1 a shard is damaged (re-run the same prepare command: it rebuilds damaged shards),
2 a folder is not a prepared split.
"""


def _split_folders(folder: Path) -> list[Path]:
    """``folder`` if it holds a manifest, else its subfolders that do, sorted.

    Raises:
        FileNotFoundError: if neither (:func:`~aero_lightning.data.shards.read_manifest`'s message).
    """
    if (folder / MANIFEST_NAME).is_file():
        return [folder]
    found = sorted(p for p in folder.iterdir() if (p / MANIFEST_NAME).is_file()) if folder.is_dir() else []
    if not found:
        verify_split(folder)  # raises, with the message that says what a split folder is
    return found


def verify_command(folders: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """``prepare verify``: check splits (:func:`~aero_lightning.data.shards.verify_split`) and print a report.

    Args:
        folders: split folders, or folders whose subfolders are splits.

    Returns:
        One :func:`~aero_lightning.data.shards.verify_split` result per split.

    Raises:
        SystemExit: status 1 if a shard is damaged.
        FileNotFoundError: if a folder holds no split (a :class:`~aero_lightning.errors.UserError`).
    """
    results = []
    for folder in folders:
        for split in _split_folders(Path(folder)):
            result = verify_split(split)
            results.append(result)
            checked = f"{result['hashed']} of {result['num_shards']} by sha256"
            if result["ok"]:
                print(
                    f"{split}: ok, {result['num_shards']} shards, {result['num_samples']} samples, "
                    f"{result['hours']:.2f} h ({checked})"
                )
                continue
            print(f"{split}: DAMAGED, {len(result['damaged'])} of {result['num_shards']} shards ({checked})")
            for shard in result["damaged"]:
                print(f"  {shard['name']}: {shard['reason']}")
    damaged = [r for r in results if not r["ok"]]
    if len(results) > 1:
        print(f"{len(results)} splits: {len(results) - len(damaged)} ok, {len(damaged)} damaged")
    if damaged:
        print("re-run the prepare command that built a damaged split: it rebuilds the damaged shards only")
        raise SystemExit(1)
    return results


def _parse_verify(argv: Sequence[str]) -> dict[str, Any]:
    """``verify``'s arguments: one or more folders.

    Raises:
        ValueError: without a folder, or for a ``key=value`` argument.
    """
    if not argv:
        raise ValueError("verify needs at least one split folder")
    bad = [a for a in argv if "=" in a]
    if bad:
        raise ValueError(f"verify takes folders, not key=value arguments: {bad}")
    return {"folders": list(argv)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
    """Command-line entry point; see :data:`USAGE` and :data:`VERIFY_USAGE`.

    Args:
        argv: ``key=value`` arguments, or ``verify`` and folders; ``sys.argv[1:]`` when ``None``.

    Returns:
        The written manifest, or ``verify``'s results.

    Raises:
        SystemExit: with the usage text on ``-h``/``--help`` (status 0), on bad arguments or a user error such as a
            missing source folder (status 2), or, for ``verify``, on a damaged shard (status 1).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["verify"]:
        return run_key_value_cli(args[1:], VERIFY_USAGE, _parse_verify, verify_command)
    return run_key_value_cli(args, USAGE, parse_args, prepare_corpus)


if __name__ == "__main__":
    main()
