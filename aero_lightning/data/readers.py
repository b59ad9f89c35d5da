"""Readers of corpus folders in their official layouts: the ordered inputs a corpus split is built from.

- LibriSpeech (:func:`read_librispeech_folder`): ``*.trans.txt`` transcripts next to ``*.flac`` utterances;
- *table* layouts (:func:`read_table_folder`, a registry :class:`~aero_lightning.data.corpora.FolderTable`):
  metadata files (CSV, TSV, JSON, JSON Lines or regex-parsed lines) whose rows name audio files below the folder;
- :func:`read_folder` picks the reader of a registered corpus.

Each reader returns :class:`FolderInput` records sorted by key; an input that cannot be used is kept with its reject
reason, so the caller decides what to do with it. Corpus preparation (:mod:`aero_lightning.data.prepare`) turns the
inputs into shards; the long-form builder and the benchmark sources (:mod:`aero_lightning.eval`) read LibriSpeech
folders directly. This module reads files only: it decodes no audio and writes nothing.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aero_lightning.data.corpora import CORPORA, CorpusSpec, FolderTable

log = logging.getLogger(__name__)

__all__ = [
    "AUDIO_EXTENSIONS",
    "FOLDER_READERS",
    "KEY_UNSAFE",
    "UNSUPPORTED_LAYOUTS",
    "FolderInput",
    "as_text",
    "describe_table",
    "read_folder",
    "read_librispeech_folder",
    "read_table_folder",
]

KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
"""Characters not allowed in sample keys (and split names); a run of them becomes ``_`` in a key."""


@dataclass(frozen=True)
class FolderInput:
    """One input found in an official folder layout.

    Attributes:
        key: sample key (unique within the corpus split), e.g. ``"103-1240-0000"``.
        audio_path: absolute path of the audio file, ``None`` if the transcript has no audio.
        text: transcript, ``None`` if the audio has no transcript line.
        source: provenance, the audio (or transcript) path relative to the source root.
        question: question (``aqa``) or instruction text (``instruct``), ``None`` if none.
        reject: rejection reason decided while reading (a key of
            :data:`aero_lightning.data.rejects.REJECT_REASONS`), else ``None``.
        detail: human-readable message of ``reject``.
    """

    key: str
    audio_path: str | None
    text: str | None
    source: str
    question: str | None = None
    reject: str | None = None
    detail: str = ""


def read_librispeech_folder(root: str | os.PathLike) -> list[FolderInput]:
    """Inputs of a folder in LibriSpeech's official layout.

    Layout: ``<root>/.../<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` with lines
    ``<speaker>-<chapter>-<utt> TRANSCRIPT`` next to ``<speaker>-<chapter>-<utt>.flac``. ``root`` may be one
    subset (``LibriSpeech/train-clean-100``) or the ``LibriSpeech`` folder holding several; all ``*.trans.txt``
    and ``*.flac`` files below it are used. Transcripts are stripped of surrounding whitespace, otherwise
    verbatim.

    Args:
        root: the folder.

    Returns:
        One :class:`FolderInput` per key found in a transcript or as an audio file, sorted by key. A key seen
        twice keeps its first occurrence in sorted path order.

    Raises:
        FileNotFoundError: if ``root`` is not a folder or holds neither transcripts nor FLAC files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LibriSpeech folder {root} does not exist")
    transcripts: dict[str, tuple[str, str]] = {}
    for trans in sorted(root.rglob("*.trans.txt")):
        rel = trans.relative_to(root).as_posix()
        for line in trans.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            key, _, text = line.strip().partition(" ")
            if key in transcripts:
                log.warning("%s: duplicate transcript key %s (keeping %s)", rel, key, transcripts[key][1])
                continue
            transcripts[key] = (text.strip(), rel)
    audio: dict[str, Path] = {}
    for path in sorted(root.rglob("*.flac")):
        key = path.name[: -len(".flac")]
        if key in audio:
            log.warning("duplicate audio key %s: keeping %s, ignoring %s", key, audio[key], path)
            continue
        audio[key] = path
    if not transcripts and not audio:
        raise FileNotFoundError(
            f"{root} holds no *.trans.txt or *.flac file; expected LibriSpeech's layout "
            "<root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt + <speaker>-<chapter>-<utt>.flac"
        )
    inputs = []
    for key in sorted(set(transcripts) | set(audio)):
        path = audio.get(key)
        text, trans_rel = transcripts.get(key, (None, ""))
        source = path.relative_to(root).as_posix() if path is not None else trans_rel
        inputs.append(FolderInput(key, str(path.resolve()) if path is not None else None, text, source))
    return inputs


FOLDER_READERS: dict[str, Callable[[Path], list[FolderInput]]] = {"librispeech": read_librispeech_folder}
"""Folder layouts with a dedicated reader: registry ``folder_layout`` -> reader returning ordered inputs.

Layouts described by a registry ``folder_table`` are read by :func:`read_table_folder` instead."""

UNSUPPORTED_LAYOUTS: dict[str, str] = {
    "tedlium": "TED-LIUM 3's layout is whole-talk SPH audio + STM lines '<talk> 1 <speaker> <start> <end> "
    "<label> <text>'; cutting segments out of talks is not implemented",
    "instructs2s": "InstructS2S-200K is multi-turn dialogues (tarball parts en_part_*) whose speech layout "
    "we could not verify; a table layout needs one row per (audio file, instruction, response)",
}
"""Registry layouts without a reader, with the reason, used in the :class:`NotImplementedError` message."""

AUDIO_EXTENSIONS: tuple[str, ...] = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".au")
"""Files indexed as audio by :func:`read_table_folder` (lower-cased suffix; anything libsndfile decodes)."""

_TABLE_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl"}


class _Cell(str):
    """A metadata value in a template: numeric format specs (``"{start:06d}"``, ``"{t:.3f}"``) convert it."""

    def __format__(self, spec: str) -> str:
        if spec and spec[-1] in "bdoxX":
            return format(int(float(self)), spec)  # ValueError for non-numeric text: the template fails
        if spec and spec[-1] in "eEfFgG%":
            return format(float(self), spec)
        return super().__format__(spec)


def _fill(template: str, cells: Mapping[str, str]) -> str | None:
    """``template`` formatted with a row's cells, ``None`` if a column is missing or a value does not fit."""
    try:
        return template.format_map(cells)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        return None


def _cells(row: Mapping[str, Any]) -> dict[str, str]:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, (list, dict)):
            return json.dumps(value, ensure_ascii=False)
        return str(value)

    return {str(k): _Cell(cell(v)) for k, v in row.items()}


def _strip_audio_ext(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in AUDIO_EXTENSIONS else name


class _AudioIndex:
    """File name and stem -> path of the audio files below some folders; the first in sorted walk order wins.

    Symlinked folders are followed (each real folder once).
    """

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = list(dirs)
        self.lookup: dict[str, Path] = {}
        self.num_files = 0
        self.num_ambiguous = 0
        self.first_ambiguous = ""
        visited: set[str] = set()
        for top in self.dirs:
            for folder, subdirs, files in os.walk(top, followlinks=True):
                real = os.path.realpath(folder)
                if real in visited:
                    subdirs[:] = []
                    continue
                visited.add(real)
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for name in sorted(files):
                    stem, ext = os.path.splitext(name)
                    if name.startswith(".") or ext.lower() not in AUDIO_EXTENSIONS:
                        continue
                    path = Path(folder, name)
                    self.num_files += 1
                    if stem in self.lookup:
                        self.num_ambiguous += 1
                        self.first_ambiguous = self.first_ambiguous or f"{self.lookup[stem]} / {path}"
                    for entry in (name, stem):
                        self.lookup.setdefault(entry, path)

    def find(self, candidate: str) -> Path | None:
        """The audio file ``candidate`` names: a path relative to an audio folder, a file name or a stem."""
        candidate = candidate.strip().replace("\\", "/")
        if not candidate:
            return None
        if "/" in candidate and not candidate.startswith("/"):
            for top in self.dirs:
                path = top / candidate
                if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                    return path
        name = candidate.rsplit("/", 1)[-1]
        return self.lookup.get(name) or self.lookup.get(_strip_audio_ext(name))


def _table_format(table: FolderTable, path: Path) -> str:
    if table.format != "auto":
        return table.format
    fmt = _TABLE_SUFFIX_FORMATS.get(path.suffix.lower()) or ("lines" if table.line_regex else None)
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the metadata format from its suffix; the layout needs format=")
    return fmt


def _read_table_rows(table: FolderTable, path: Path) -> list[dict[str, Any]]:
    """Rows of one metadata file; a row that cannot be parsed is ``{"_error": message}`` (JSON Lines only).

    Raises:
        ValueError: if the file is not in the layout's format (bad JSON, no row list).
    """
    fmt = _table_format(table, path)
    rows: list[dict[str, Any]] = []
    if fmt in ("csv", "tsv"):
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            lines = (line for line in f if not (table.comment and line.lstrip().startswith(table.comment)))
            reader = csv.DictReader(
                lines,
                fieldnames=list(table.fieldnames) if table.fieldnames else None,
                delimiter="\t" if fmt == "tsv" else ",",
                skipinitialspace=True,
            )
            if reader.fieldnames:
                reader.fieldnames = [name.strip() for name in reader.fieldnames]
            for row in reader:
                rows.append(
                    {k: v.strip() if isinstance(v, str) else v for k, v in row.items() if k is not None}
                )
        return rows
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if fmt == "lines":
        pattern = re.compile(str(table.line_regex))
        return [m.groupdict() for m in map(pattern.match, text.splitlines()) if m is not None]
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                row = {"_error": f"line {number}: {err}"}
            rows.append(row if isinstance(row, dict) else {"_error": f"line {number}: not a JSON object"})
        return rows
    data = json.loads(text)  # ValueError on bad JSON
    if isinstance(data, dict):
        if table.json_field is not None:
            data = data.get(table.json_field)
        elif data and all(isinstance(v, dict) for v in data.values()):
            data = [{"_key": k, **v} for k, v in data.items()]
    if not isinstance(data, list):
        where = f"a list under {table.json_field!r}" if table.json_field else "a list or an object of objects"
        raise ValueError(f"{path}: expected {where}")
    return [row if isinstance(row, dict) else {"_error": "not a JSON object"} for row in data]


def _table_label_names(table: FolderTable, root: Path) -> dict[str, str]:
    if table.label_file is None:
        return {}
    pattern, key_col, name_col = table.label_file
    paths = sorted(p for p in root.glob(pattern) if p.is_file())
    if not paths:
        raise FileNotFoundError(f"{root} has no label file matching {pattern!r} ({key_col} -> {name_col})")
    names: dict[str, str] = {}
    for path in paths:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            for row in csv.DictReader(f, skipinitialspace=True):
                if row.get(key_col) and row.get(name_col):
                    names.setdefault(row[key_col].strip(), row[name_col].strip())
    return names


def _table_text(
    table: FolderTable, raw: Any, task: str, names: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """``(text, None)`` of a text cell, or ``(None, reason detail)`` if its labels are all unusable."""
    if not (table.label_sep or table.label_map or names):
        return as_text(raw, None, task), None
    if raw is None:
        return None, None
    parts = []
    for value in raw if isinstance(raw, (list, tuple)) else [raw]:
        pieces = str(value).split(table.label_sep) if table.label_sep else [str(value)]
        parts.extend(p.strip() for p in pieces if p.strip())
    if not parts:
        return "", None
    labels = []
    for part in parts:
        label = names.get(part, part)
        label = table.label_map[label] if label in table.label_map else label
        if label is not None:
            labels.append(label)
    if not labels:
        return None, f"label {', '.join(parts)!r} has no usable class"
    return (", ".join(dict.fromkeys(labels)) if task == "classify" else labels[0]), None


def describe_table(table: FolderTable, split: str) -> str:
    """One-line description of a table layout's ``split`` for error messages.

    Args:
        table: the layout.
        split: our split name.

    Returns:
        E.g. ``"metadata 'train.csv' with columns [...] + audio '{youtube_id}' below the folder"``.
    """
    meta = table.metadata.get(split, "?")
    if not table.audio:
        return f"audio files {meta!r} named like {table.filename_regex!r}"
    where = repr(table.audio_dirs[split]) if split in table.audio_dirs else "the folder"
    audio = " or ".join(repr(t) for t in table.audio)
    return f"metadata {meta!r} with columns {sorted(table.columns_used(split))} + audio {audio} below {where}"


def read_table_folder(
    table: FolderTable,
    root: str | os.PathLike,
    split: str = "train",
    *,
    task: str = "caption",
    name: str = "",
) -> list[FolderInput]:
    """Inputs of ``split`` of a folder in a *table* layout (a registry ``FolderTable``).

    Args:
        table: the layout.
        root: the folder.
        split: our split name, a key of ``table.metadata``.
        task: the corpus task (a ``classify`` sample joins several labels with ``", "``).
        name: corpus name, for messages.

    Returns:
        One :class:`FolderInput` per metadata row (per text column of it), sorted by key. Rows whose audio is
        not found carry ``reject="missing_audio"``, rows without a usable label ``reject="unlabelled"``, JSON
        Lines that do not parse ``reject="unreadable_row"``.

    Raises:
        ValueError: if ``split`` is not in the layout, or a metadata file lacks the layout's columns or is not
            in its format.
        FileNotFoundError: if ``root`` is not a folder, or holds no metadata file, audio folder or label file
            matching the layout's globs.
    """
    root = Path(root)
    label = name or "corpus"
    if not root.is_dir():
        raise FileNotFoundError(f"{label} folder {root} does not exist")
    if split not in table.metadata:
        raise ValueError(
            f"{label}: the folder layout has no split {split!r} (splits: {', '.join(table.metadata)}); pass "
            "metadata=GLOB to name the metadata file of another split"
        )
    expected = describe_table(table, split)
    paths = sorted(p for p in root.glob(table.metadata[split]) if p.is_file())
    if not paths:
        raise FileNotFoundError(
            f"{root} holds no {table.metadata[split]!r}; expected {label}'s layout: {expected}"
        )
    names = _table_label_names(table, root)
    inputs: list[FolderInput] = []
    used: set[str] = set()
    next_suffix: dict[str, int] = {}

    def unique(key: str) -> str:
        if key in used:
            n = next_suffix.get(key, 2)
            while f"{key}_{n}" in used:
                n += 1
            next_suffix[key] = n + 1
            key = f"{key}_{n}"
        used.add(key)
        return key

    def add(
        key: str, audio: Path | None, source: str, row: Mapping[str, Any], reject: tuple[str, str] | None
    ) -> None:
        question = row.get(table.question) if table.question else None
        question = None if question is None else str(question)
        for i, column in enumerate(table.text, 1):
            key_i = unique(f"{key}_c{i}" if len(table.text) > 1 else key)
            text, unlabelled = _table_text(table, row.get(column), task, names)
            why = reject or (("unlabelled", f"{source}: {unlabelled}") if unlabelled else None)
            inputs.append(
                FolderInput(
                    key_i,
                    str(audio.resolve()) if audio is not None else None,
                    text,
                    source,
                    question=question,
                    reject=why[0] if why else None,
                    detail=why[1] if why else "",
                )
            )

    if not table.audio:  # the metadata glob lists the audio files; the file name holds the columns
        pattern = re.compile(str(table.filename_regex))
        skipped = 0
        for path in paths:
            if path.name.startswith(".") or path.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            match = pattern.match(path.name)
            if match is None:
                skipped += 1
                continue
            row = {**match.groupdict(), "_stem": path.stem}
            key = _fill(table.key, _cells(row)) if table.key else path.stem
            key = KEY_UNSAFE.sub("_", key or "").strip("_") or path.stem
            add(key, path, path.relative_to(root).as_posix(), row, None)
        if skipped:
            log.warning("%s: %d audio file(s) do not match %s; ignored", label, skipped, table.filename_regex)
        inputs.sort(key=lambda item: item.key)
        return inputs

    dir_glob = table.audio_dirs.get(split)
    dirs = sorted(p for p in root.glob(dir_glob) if p.is_dir()) if dir_glob else [root]
    if not dirs:
        raise FileNotFoundError(
            f"{root} holds no audio folder {dir_glob!r}; expected {label}'s layout: {expected}"
        )
    index = _AudioIndex(dirs)
    if index.num_ambiguous:
        log.warning(
            "%s: %d audio stems occur more than once (using the first in sorted order), e.g. %s",
            label, index.num_ambiguous, index.first_ambiguous,
        )  # fmt: skip
    split_filter = table.split_filter.get(split)
    required = table.columns_used(split)
    num_rows = 0
    for path in paths:
        rel = path.relative_to(root).as_posix()
        rows = _read_table_rows(table, path)
        first = next((r for r in rows if "_error" not in r), None)
        if first is not None and not required <= set(first):
            raise ValueError(
                f"{rel} lacks the columns {sorted(required - set(first))} of {label}'s layout (has "
                f"{sorted(first)}); expected {expected}"
            )
        for number, row in enumerate(rows, 1):
            where = f"{rel}:{number}"
            if "_error" in row:
                stem = KEY_UNSAFE.sub("_", path.stem)
                add(f"{stem}_{number}", None, where, {}, ("unreadable_row", f"{where}: {row['_error']}"))
                continue
            if split_filter is not None and str(row.get(split_filter[0], "")).strip() not in split_filter[1]:
                continue
            num_rows += 1
            cells = _cells(row)
            candidates = [c for c in (_fill(t, cells) for t in table.audio) if c]
            audio = next((hit for hit in map(index.find, candidates) if hit is not None), None)
            raw_key = (
                _fill(table.key, cells)
                if table.key
                else _strip_audio_ext((candidates or [""])[0].rsplit("/", 1)[-1])
            )
            key = (
                KEY_UNSAFE.sub("_", raw_key or "").strip("_") or f"{KEY_UNSAFE.sub('_', path.stem)}_{number}"
            )
            if audio is None:
                named = " / ".join(repr(c) for c in candidates) or "(no audio name in the row)"
                add(key, None, where, row, ("missing_audio", f"{where}: no audio file {named}"))
            else:
                add(
                    key,
                    audio,
                    audio.relative_to(root).as_posix() if audio.is_relative_to(root) else str(audio),
                    row,
                    None,
                )
    missing = sum(item.reject == "missing_audio" for item in inputs)
    log.info(
        "%s/%s: %d metadata rows in %d file(s) -> %d inputs; %d audio files indexed, %d inputs without audio",
        label, split, num_rows, len(paths), len(inputs), index.num_files, missing,
    )  # fmt: skip
    if inputs and missing == len(inputs):
        log.warning("%s: no audio file found for any row; is %s the folder holding the audio? expected %s",
                    label, root, expected)  # fmt: skip
    inputs.sort(key=lambda item: item.key)
    return inputs


def _table_layouts() -> list[str]:
    return sorted(
        {s.folder_layout for s in CORPORA.values() if s.folder_table is not None and s.folder_layout}
    )


def read_folder(spec: CorpusSpec, root: str | os.PathLike, split: str = "train") -> list[FolderInput]:
    """Inputs of ``root`` read with the reader of ``spec.folder_layout`` (or its ``folder_table``).

    Args:
        spec: the corpus.
        root: a folder in the corpus's official layout.
        split: our split name (table layouts pick the split's metadata; LibriSpeech reads all of ``root``).

    Returns:
        The ordered inputs.

    Raises:
        ValueError: if the corpus has no folder layout, or (table layouts) the split is not in it or a
            metadata file does not fit it.
        NotImplementedError: if its layout has no reader.
        FileNotFoundError: if the folder does not look like the layout.
    """
    if not spec.folder_layout:
        raise ValueError(
            f"corpus {spec.name!r} has no official folder layout in the registry; pass source= an HF dataset id "
            f"(default {spec.hf_id!r}) or a folder written with Dataset.save_to_disk"
        )
    if spec.folder_table is not None:
        return read_table_folder(spec.folder_table, root, split, task=spec.task, name=spec.name)
    reader = FOLDER_READERS.get(spec.folder_layout)
    if reader is None:
        reason = UNSUPPORTED_LAYOUTS.get(spec.folder_layout)
        raise NotImplementedError(
            f"folder layout {spec.folder_layout!r} of corpus {spec.name!r} is not implemented"
            + (f" ({reason})" if reason else "")
            + f"; implemented: {', '.join(sorted([*FOLDER_READERS, *_table_layouts()]))}. Pass source= an HF "
            "dataset id"
            + (f" (registry: {spec.hf_id!r})" if spec.hf_id else "")
            + " or a save_to_disk folder instead"
        )
    return reader(Path(root))


def as_text(value: Any, names: list[str] | None, task: str) -> str | None:
    """A text or label cell as a string.

    Args:
        value: the cell: a string, a class id (int), a list of either, or None.
        names: class names of an integer label column (``ClassLabel``), or None.
        task: the corpus task; a ``classify`` list joins its non-empty parts with ``", "``, any other task keeps
            the first.

    Returns:
        The text (class ids replaced by their names when known), ``""`` for a list without text, None for None.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [t for t in (as_text(v, names, task) for v in value) if t and t.strip()]
        if not parts:
            return ""
        return ", ".join(parts) if task == "classify" else parts[0]
    if names is not None and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return names[int(value)] if 0 <= int(value) < len(names) else str(value)
    return str(value)
