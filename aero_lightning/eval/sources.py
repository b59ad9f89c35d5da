"""Read a benchmark's samples from the hub or a local source, as 16 kHz mono waveforms with references.

Sources (``source`` in a benchmark's config; None = the registry's HF dataset):

- an HF hub id: ``datasets.load_dataset(id, config, split=...)`` (``streaming=True`` reads without a full
  download; not for long-form, which groups rows by chapter first);
- a folder written by ``datasets.save_to_disk`` (``dataset_info.json`` / ``state.json`` / ``dataset_dict.json``);
- a folder of prepared WebDataset shards with ``manifest.json`` (the format of :mod:`aero_lightning.data.shards`,
  written by corpus preparation and the demo corpus builder), read with the training stream's shard reader
  (:func:`aero_lightning.data.shard_reader.iter_samples`: the same audio members, checks and reject reasons, and a
  truncated shard is counted); the reference is the sample's assistant text;
- a LibriSpeech-layout folder (``*.trans.txt`` + ``*.flac``): utterances, or chapters for long-form benchmarks;
- a JSON Lines manifest (``.jsonl``): one object per sample, ``{"audio": path, "text": ...}`` for ASR,
  ``{"audio", "question", "choices": [...], "answer": text|letter|index, "group"}`` for multiple choice, or
  ``{"audio", "answer": text or [texts], "question", "context", "group"}`` for the open tasks (``caption``,
  ``aqa``, ``classify``, ``instruct``; the reference may also be given as ``references``, ``captions``, ``label``
  or ``text``, and ``question`` is optional); audio paths are relative to the manifest's folder. Optional ``"id"``.

Prepared shards of an open task are decoded with each sample's own prompt messages (its question or instruction,
every audio clip, earlier turns) and scored against its last assistant turn; consecutive caption samples
``<key>_c1``, ``<key>_c2``, ... (one per reference caption, as corpus preparation writes them) are joined back into
one item with all their references. An HF dataset with one reference per row is joined by its ``group_by`` column
(:class:`~aero_lightning.eval.benchmarks.BenchmarkSpec`).

HF audio columns are read undecoded (``Audio(decode=False)``) and decoded with libsndfile, then resampled to 16 kHz
with soxr. A sample whose audio cannot be read, whose text is missing or whose answer is not among its options is
skipped and counted by reason (``rejects``, reasons from :data:`aero_lightning.data.rejects.REJECT_REASONS`), never
fatal.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aero_lightning.data.audio_io import AudioReadError, load_audio, to_mono_16k
from aero_lightning.data.chat import prompt_messages, reference_text
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.readers import read_librispeech_folder
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.eval.benchmarks import OPEN_TASKS, BenchmarkSpec
from aero_lightning.eval.longform import (
    join_waveforms,
    librispeech_chapters,
    load_longform_audio,
    utterance_order,
)

logger = logging.getLogger(__name__)

__all__ = ["EvalItem", "detect_format", "iter_items", "iter_shard_items", "source_size"]

TEXT_FALLBACKS = ("text", "sentence", "normalized_text", "transcript", "transcription")
"""Transcript columns tried in order when the configured one is absent (the leaderboard's ``get_text``)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class EvalItem:
    """One decoded evaluation sample.

    Attributes:
        key: sample id.
        waveform: ``(T,)`` float32 at 16 kHz.
        reference: transcript (ASR).
        question, choices, answer, group: multiple-choice fields (``answer`` is the 0-based correct option).
        references: open tasks: the accepted captions / answers / labels.
        context: the audio description an LLM judge reads (AIR-Bench's ``meta_info``).
        task: the sample's own task (prepared shards), else "".
        messages: the prompt messages to decode with (prepared shards of an open task), else None: the prompt is
            built from ``question`` and the benchmark's instruction.
        clips: every audio clip of the sample, in order, when it has several (``waveform`` is then the first).
        num_rows: source samples this item stands for (several when rows with one reference each are joined).
    """

    key: str
    waveform: np.ndarray
    reference: str = ""
    question: str = ""
    choices: tuple[str, ...] = ()
    answer: int = -1
    group: str = ""
    references: tuple[str, ...] = ()
    context: str = ""
    task: str = ""
    messages: list | None = None
    clips: tuple[np.ndarray, ...] | None = None
    num_rows: int = 1

    @property
    def duration_s(self) -> float:
        if self.clips:
            return sum(len(c) for c in self.clips) / SAMPLE_RATE_HZ
        return len(self.waveform) / SAMPLE_RATE_HZ


def detect_format(source: str | os.PathLike) -> str:
    """``shards``, ``hf_saved``, ``librispeech``, ``jsonl`` or ``hub`` (not a local path) for a source.

    Raises:
        ValueError: for a local folder of none of the known layouts.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".json"):
            return "jsonl"
        raise ValueError(f"{path}: a file source must be a .jsonl manifest")
    if not path.is_dir():
        if _HUB_ID.match(str(source)):
            return "hub"
        raise FileNotFoundError(f"benchmark source {path} does not exist (and is not a hub id 'org/name')")
    if (path / "manifest.json").is_file():
        return "shards"
    if any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return "hf_saved"
    if next(path.rglob("*.trans.txt"), None) is not None:
        return "librispeech"
    raise ValueError(
        f"{path} is not a known benchmark layout: expected manifest.json (prepared shards), a datasets "
        "save_to_disk folder, a LibriSpeech folder (*.trans.txt), or a .jsonl manifest file"
    )


# ----------------------------------------------------------------------------------------------- fields


def _answer_index(answer: Any, choices: Sequence[str], fmt: str) -> int | None:
    if answer is None:
        return None
    if fmt == "index" or (isinstance(answer, (int, np.integer)) and not isinstance(answer, bool)):
        idx = int(answer)
        return idx if 0 <= idx < len(choices) else None
    text = str(answer).strip()
    if fmt == "letter" or (
        len(text) == 1 and text.isalpha() and text.upper() not in [c.strip() for c in choices]
    ):
        idx = ord(text.upper()) - ord("A")
        return idx if 0 <= idx < len(choices) else None
    stripped = [c.strip() for c in choices]
    if text in stripped:
        return stripped.index(text)
    lowered = [c.lower() for c in stripped]
    return lowered.index(text.lower()) if text.lower() in lowered else None


def _choices_of(row: Mapping[str, Any], spec: BenchmarkSpec, cols: Mapping[str, str]) -> list[str]:
    if spec.choice_columns:
        return [
            str(row[c]).strip() for c in spec.choice_columns if row.get(c) is not None and str(row[c]).strip()
        ]
    value = row.get(cols.get("choices", "choices"))
    if isinstance(value, str):
        value = json.loads(value)
    return [str(v) for v in (value or [])]


def _choice_item(key, wave, row, spec, cols, rejects: RejectCounter) -> EvalItem | None:
    try:
        choices = _choices_of(row, spec, cols)
    except (ValueError, TypeError) as err:
        rejects.reject("bad_choices", key, str(err))
        return None
    if len(choices) < 2:
        rejects.reject("bad_choices", key, f"{len(choices)} option(s)")
        return None
    answer = _answer_index(row.get(cols.get("answer", "answer")), choices, spec.answer_format)
    if answer is None:
        rejects.reject(
            "answer_not_in_choices", key, f"{row.get(cols.get('answer', 'answer'))!r} not in {choices}"
        )
        return None
    question = str(row.get(cols.get("question", "question")) or "").strip()
    group = str(row.get(cols.get("group", "group")) or "")
    return EvalItem(key, wave, question=question, choices=tuple(choices), answer=answer, group=group)


REFERENCE_FIELDS = ("answer", "references", "captions", "label", "text")
"""JSON Lines fields tried in order for an open task's reference(s)."""


def _as_references(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, (list, tuple, np.ndarray)):
        value = [value]
    return tuple(str(v).strip() for v in value if v is not None and str(v).strip())


def _open_item(key, wave, row, spec: BenchmarkSpec, cols: Mapping[str, str], rejects) -> EvalItem | None:
    if spec.reference_columns:
        refs = tuple(r for c in spec.reference_columns for r in _as_references(row.get(c)))
    elif "answer" in cols:
        refs = _as_references(row.get(cols["answer"]))
    else:  # a JSON Lines row: the first reference field it has
        refs = _as_references(next((row[f] for f in REFERENCE_FIELDS if row.get(f) is not None), None))
    if not refs:
        rejects.reject("missing_text", key)
        return None
    return EvalItem(
        key,
        wave,
        question=str(row.get(cols.get("question", "question")) or "").strip(),
        group=str(row.get(cols.get("group", "group")) or ""),
        references=refs,
        context=str(row.get(cols.get("context", "context")) or "").strip(),
    )


def _asr_item(key, wave, text, rejects: RejectCounter) -> EvalItem | None:
    if text is None:
        rejects.reject("missing_text", key)
        return None
    return EvalItem(key, wave, reference=str(text))


# ---------------------------------------------------------------------------------------------- readers


def _iter_shards(folder: Path, spec: BenchmarkSpec, rejects: RejectCounter) -> Iterator[EvalItem]:
    from aero_lightning.data.shard_reader import iter_samples, resolve_split, shard_sample_counts

    if spec.task == "choice":
        raise ValueError(
            f"{spec.name}: prepared shards hold no answer options; a choice benchmark needs .jsonl or HF"
        )
    urls = resolve_split(folder)
    samples = iter_samples(urls, rejects, expected_samples=shard_sample_counts(folder))
    if spec.task == "asr":
        for sample in samples:
            yield EvalItem(sample["key"], sample["waveform"], reference=reference_text(sample["messages"]))
        return
    pending: list[dict] = []  # consecutive samples of one clip's captions (<key>_c1, <key>_c2, ...)
    for sample in samples:
        if not sample["waveforms"]:  # a text-only chat sample: nothing for an audio benchmark to decode
            rejects.reject("empty_audio", sample["key"], "a text-only sample (no audio clip)")
            continue
        stem = _caption_stem(sample["key"]) if spec.task == "caption" else None
        if pending and (stem is None or stem != _caption_stem(pending[0]["key"])):
            yield _shard_open_item(pending, spec.task == "caption")
            pending = []
        pending.append(sample)
        if stem is None:
            yield _shard_open_item(pending, spec.task == "caption")
            pending = []
    if pending:
        yield _shard_open_item(pending, spec.task == "caption")


def iter_shard_items(
    folder: str | os.PathLike, rejects: RejectCounter | None = None, max_items: int | None = None
) -> Iterator[EvalItem]:
    """Items of a prepared split whose samples may be of any task (a validation set), each with its ``task``.

    ASR samples become ASR items (``reference``: the transcript); the others are decoded with their own prompt
    messages and scored against their last assistant turn, and consecutive caption samples ``<key>_c<i>`` of one
    clip are one item, as for a benchmark of that task (:func:`iter_items`).

    Args:
        folder: a prepared split folder.
        rejects: receives skipped samples and damaged shards by reason (a fresh counter when None).
        max_items: stop after this many items.

    Yields:
        :class:`EvalItem` with ``task`` set, in shard order.
    """
    from aero_lightning.data.shard_reader import iter_samples, resolve_split, shard_sample_counts

    rejects = rejects if rejects is not None else RejectCounter()
    samples = iter_samples(resolve_split(folder), rejects, expected_samples=shard_sample_counts(folder))
    count = 0
    pending: list[dict] = []

    def emit(group: list[dict]) -> EvalItem:
        task = str(group[0].get("task") or "asr")
        if task == "asr":
            s = group[0]
            return EvalItem(s["key"], s["waveform"], reference=reference_text(s["messages"]), task="asr")
        return _shard_open_item(group, task == "caption")

    for sample in samples:
        task = str(sample.get("task") or "asr")
        stem = _caption_stem(sample["key"]) if task == "caption" else None
        if pending and (stem is None or stem != _caption_stem(pending[0]["key"])):
            yield emit(pending)
            pending = []
            count += 1
            if max_items is not None and count >= max_items:
                return
        pending.append(sample)
        if stem is None:
            yield emit(pending)
            pending = []
            count += 1
            if max_items is not None and count >= max_items:
                return
    if pending:
        yield emit(pending)


_CAPTION_KEY = re.compile(r"^(.*)_c\d+$")


def _caption_stem(key: str) -> str | None:
    m = _CAPTION_KEY.match(key)
    return m.group(1) if m else None


def _last_user_text(messages) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c.strip()
            return " ".join(p.get("text", "") for p in c or [] if p.get("type") == "text").strip()
    return ""


def _shard_open_item(samples: list[dict], caption: bool) -> EvalItem:
    """One item from a shard sample, or from the consecutive caption samples of one clip (``caption``: keyed by
    the clip, without the ``_c<i>`` suffix)."""
    first = samples[0]
    key = (_caption_stem(first["key"]) or first["key"]) if caption else first["key"]
    clips = tuple(first["waveforms"])
    prompt = prompt_messages(first["messages"])
    return EvalItem(
        key,
        clips[0] if clips else np.zeros(0, dtype=np.float32),
        question=_last_user_text(prompt),
        references=tuple(reference_text(s["messages"]).strip() for s in samples),
        task=str(first.get("task") or ""),
        messages=prompt,
        clips=clips if len(clips) != 1 else None,
        num_rows=len(samples),
    )


def _iter_jsonl(path: Path, spec: BenchmarkSpec, rejects: RejectCounter) -> Iterator[EvalItem]:
    base = path.parent
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                rejects.reject("bad_json", f"{path.name}:{n + 1}", str(err))
                continue
            key = str(row.get("id") or f"{path.stem}-{n:06d}")
            if not row.get("audio"):
                rejects.reject("missing_audio", key)
                continue
            try:
                wave = load_audio(base / row["audio"])
            except AudioReadError as err:
                rejects.reject("unreadable_audio", key, str(err))
                continue
            cols = {"question": "question", "choices": "choices", "answer": "answer", "group": "group"}
            if spec.task == "asr":
                item = _asr_item(key, wave, row.get("text"), rejects)
            elif spec.task == "choice":
                item = _choice_item(key, wave, row, spec, cols, rejects)
            else:
                item = _open_item(key, wave, row, spec, {"question": "question", "group": "group"}, rejects)
            if item is not None:
                yield item


def _iter_librispeech(root: Path, spec: BenchmarkSpec, rejects: RejectCounter) -> Iterator[EvalItem]:
    if spec.longform == "librispeech_chapter":
        chapters, skipped = librispeech_chapters(root)
        for r in skipped:  # librispeech_chapters logged them
            rejects.reject(r["reason"], r["key"], r["detail"], log=False)
        for chapter in chapters:
            try:
                wave = load_longform_audio(chapter)
            except AudioReadError as err:
                rejects.reject("unreadable_audio", chapter.key, str(err))
                continue
            yield EvalItem(chapter.key, wave, reference=chapter.text)
        return
    for item in read_librispeech_folder(root):
        if item.audio_path is None:
            rejects.reject("missing_audio", item.key)
            continue
        try:
            wave = load_audio(item.audio_path)
        except AudioReadError as err:
            rejects.reject("unreadable_audio", item.key, str(err))
            continue
        out = _asr_item(item.key, wave, item.text, rejects)
        if out is not None:
            yield out


def _hf_wave(value: Any) -> np.ndarray:
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            return to_mono_16k(np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]))
        if value.get("bytes"):
            return load_audio(value["bytes"])
        if value.get("path"):
            return load_audio(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        return load_audio(bytes(value))
    elif isinstance(value, (str, os.PathLike)):
        return load_audio(value)
    raise AudioReadError(f"no audio bytes, path or array in a {type(value).__name__} cell")


def _load_hf(source: str, kind: str, spec: BenchmarkSpec, split: str, config: str | None, streaming: bool):
    import datasets

    if kind == "hf_saved":
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"{source} has splits {sorted(loaded)}, not {split!r}; set the benchmark's split"
                )
            loaded = loaded[split]
        return loaded
    logger.info(
        "loading %s (config %s, split %s%s)", source, config, split, ", streaming" if streaming else ""
    )
    return datasets.load_dataset(source, config, split=split, streaming=streaming)


def _columns(dataset, spec: BenchmarkSpec) -> dict[str, str]:
    available = list(dataset.column_names or [])
    cols = dict(spec.columns)
    if spec.task == "asr" and cols.get("text") not in available:
        found = next((c for c in TEXT_FALLBACKS if c in available), None)
        if found is None:
            raise ValueError(f"{spec.name}: no transcript column among {available} (tried {cols.get('text')!r}, "
                             f"{', '.join(TEXT_FALLBACKS)})")  # fmt: skip
        cols["text"] = found
    if cols.get("audio") not in available:
        raise ValueError(f"{spec.name}: audio column {cols.get('audio')!r} not in {available}")
    return cols


def _iter_hf(dataset, spec: BenchmarkSpec, rejects: RejectCounter) -> Iterator[EvalItem]:
    from datasets import Audio

    cols = _columns(dataset, spec)
    if isinstance((dataset.features or {}).get(cols["audio"]), Audio):
        dataset = dataset.cast_column(cols["audio"], Audio(decode=False))
    if spec.longform == "librispeech_chapter":
        yield from _iter_hf_chapters(dataset, spec, cols, rejects)
        return
    if spec.task in OPEN_TASKS and cols.get("group_by"):
        yield from _iter_hf_grouped(dataset, spec, cols, rejects)
        return
    for n, row in enumerate(dataset):
        key = str(row.get(cols.get("id", "id")) or f"{spec.name}-{n:06d}")
        try:
            wave = _hf_wave(row[cols["audio"]])
        except AudioReadError as err:
            rejects.reject("unreadable_audio", key, str(err))
            continue
        if wave.size == 0:
            rejects.reject("empty_audio", key)
            continue
        if spec.task == "asr":
            item = _asr_item(key, wave, row.get(cols["text"]), rejects)
        elif spec.task == "choice":
            item = _choice_item(key, wave, row, spec, cols, rejects)
        else:
            item = _open_item(key, wave, row, spec, cols, rejects)
        if item is not None:
            yield item


def _iter_hf_grouped(
    dataset, spec: BenchmarkSpec, cols: Mapping[str, str], rejects: RejectCounter
) -> Iterator[EvalItem]:
    """Rows that share ``group_by`` as one item (first-appearance order): the first row's audio, every row's
    reference in row order. Only the metadata columns are read for the grouping."""
    if not hasattr(dataset, "select_columns") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"{spec.name}: joining rows by {cols['group_by']} needs a map-style dataset (streaming=false)"
        )
    meta = dataset.select_columns([cols["group_by"], cols["answer"]])
    groups: dict[str, list[int]] = {}
    refs: dict[str, list[str]] = {}
    for i, row in enumerate(meta):
        value = str(row[cols["group_by"]])
        groups.setdefault(value, []).append(i)
        refs.setdefault(value, []).extend(_as_references(row[cols["answer"]]))
    for value, rows in groups.items():
        first = dataset[rows[0]]
        key = str(first.get(cols.get("id", "id")) or value)
        try:
            wave = _hf_wave(first[cols["audio"]])
        except AudioReadError as err:
            rejects.reject("unreadable_audio", key, str(err), count=len(rows))
            continue
        if wave.size == 0:
            rejects.reject("empty_audio", key, count=len(rows))
            continue
        if not refs[value]:
            rejects.reject("missing_text", key, count=len(rows))
            continue
        yield EvalItem(
            key,
            wave,
            question=str(first.get(cols.get("question", "question")) or "").strip(),
            group=str(first.get(cols.get("group", "group")) or ""),
            references=tuple(refs[value]),
            context=str(first.get(cols.get("context", "context")) or "").strip(),
            num_rows=len(rows),
        )


def _iter_hf_chapters(
    dataset, spec: BenchmarkSpec, cols: Mapping[str, str], rejects: RejectCounter
) -> Iterator[EvalItem]:
    """Long-form from an HF LibriSpeech copy: group rows by chapter (metadata first), then decode chapter by chapter."""
    if not hasattr(dataset, "select_columns") or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"{spec.name}: long-form needs a map-style dataset (streaming=false)")
    meta = dataset.select_columns([cols["id"]])
    chapters: dict[str, list[tuple[int, int]]] = {}
    for i, row in enumerate(meta):
        try:
            chapter, number = utterance_order(str(row[cols["id"]]))
        except ValueError as err:
            rejects.reject("bad_key", str(row[cols["id"]]), str(err))
            continue
        chapters.setdefault(chapter, []).append((number, i))
    for chapter in sorted(chapters):
        rows = [dataset[i] for _, i in sorted(chapters[chapter])]
        try:
            wave = join_waveforms([_hf_wave(r[cols["audio"]]) for r in rows])
        except AudioReadError as err:
            rejects.reject("unreadable_audio", chapter, str(err))
            continue
        texts = [r.get(cols["text"]) for r in rows]
        if any(t is None or not str(t).strip() for t in texts):
            rejects.reject("missing_transcript", chapter)
            continue
        yield EvalItem(chapter, wave, reference=" ".join(str(t).strip() for t in texts))


def iter_items(
    spec: BenchmarkSpec,
    source: str | os.PathLike | None = None,
    split: str | None = None,
    hf_config: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    rejects: Counter | None = None,
) -> Iterator[EvalItem]:
    """Samples of a benchmark, decoded to 16 kHz mono, in source order.

    Args:
        spec: the benchmark.
        source: a hub id or a local path (module docstring); None = the spec's ``hf_id``.
        split, hf_config: override the spec's split / config (HF and ``save_to_disk`` sources).
        streaming: stream an HF hub dataset instead of downloading it.
        max_samples: stop after this many samples (None: all).
        rejects: receives skipped samples by reason (:data:`~aero_lightning.data.rejects.REJECT_REASONS`); a
            :class:`~aero_lightning.data.rejects.RejectCounter` counts them as they happen, a plain Counter gets
            the counts before every yielded item and when the iteration ends.

    Yields:
        :class:`EvalItem`.

    Raises:
        ValueError: if the benchmark has no source (``demo`` needs ``source=``) or a local layout is unknown.
        FileNotFoundError: for a local path that does not exist.
    """
    counter = rejects if isinstance(rejects, RejectCounter) else RejectCounter()
    source = str(source) if source is not None else spec.hf_id
    if source is None:
        raise ValueError(f"benchmark {spec.name} has no hub copy; set its source to a local folder or .jsonl")
    kind = detect_format(source)
    if kind == "shards":
        items = _iter_shards(Path(source), spec, counter)
    elif kind == "jsonl":
        items = _iter_jsonl(Path(source), spec, counter)
    elif kind == "librispeech":
        items = _iter_librispeech(Path(source), spec, counter)
    else:
        dataset = _load_hf(source, kind, spec, split or spec.hf_split, hf_config or spec.hf_config, streaming)
        items = _iter_hf(dataset, spec, counter)
    copied: Counter = Counter()  # the counts already copied into a plain Counter ``rejects``

    def publish() -> None:
        nonlocal copied
        if rejects is not None and rejects is not counter:
            rejects.update(counter - copied)
            copied = counter.copy()

    try:
        for n, item in enumerate(items):
            if max_samples is not None and n >= max_samples:
                break
            publish()
            yield item
    finally:
        publish()


def source_size(
    spec: BenchmarkSpec,
    source: str | os.PathLike | None = None,
    split: str | None = None,
    hf_config: str | None = None,
) -> int | None:
    """How many samples a benchmark's source holds, when that is cheap to know, without reading any audio.

    Prepared shards: the manifest's sample counts (samples a damaged shard loses included); a JSON Lines manifest:
    its non-empty lines; a ``save_to_disk`` folder: the split's rows; a hub dataset: the split's
    ``num_examples`` from the dataset's metadata, when the hub answers. Long-form sources are grouped by chapter
    and LibriSpeech folders are not counted ahead: None.

    Args:
        spec, source, split, hf_config: as for :func:`iter_items`.

    Returns:
        The number of samples :func:`iter_items` will account for (yielded + skipped), or None when unknown.
    """
    source = str(source) if source is not None else spec.hf_id
    if source is None or spec.longform:
        return None
    try:
        kind = detect_format(source)
    except (ValueError, FileNotFoundError):
        return None
    if kind == "shards":
        from aero_lightning.data.shards import read_manifest

        entries = read_manifest(Path(source)).get("shards", [])
        counts = [e.get("num_samples") for e in entries]
        return None if any(c is None for c in counts) else int(sum(counts))
    if kind == "jsonl":
        with open(source, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    split = split or spec.hf_split
    try:
        import datasets

        if kind == "hf_saved":
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
            return len(loaded)
        if kind == "hub":
            info = datasets.load_dataset_builder(source, hf_config or spec.hf_config).info
            return int(info.splits[split].num_examples)
    except Exception as err:  # noqa: BLE001 - a size is a nicety: progress without a total is fine
        logger.debug("no sample count for %s: %s", source, err)
    return None
