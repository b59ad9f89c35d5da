"""Registry of public corpora for audio-LLM training.

One frozen :class:`CorpusSpec` per corpus says what the corpus teaches (``task``), where its audio comes from
(an HF ``datasets`` repository, or an official folder layout read by :mod:`aero_lightning.data.readers`), how
its columns map onto our sample fields, its licence, its size in hours and the default instructions.

Tasks (the ``task`` field of every shard sample's JSON):

- ``asr``: speech -> exact transcript; prompt :data:`~aero_lightning.data.chat.DEFAULT_ASR_PROMPT`.
- ``caption``: audio -> free-text description (sound or music captioning).
- ``aqa``: audio + question -> answer; prompts are templates holding ``{question}``.
- ``classify``: audio -> label(s) answering a fixed question (sound events, music genre or instrument,
  speech emotion). Multi-label targets are joined with ``", "``.
- ``instruct``: spoken instruction -> text response; an empty prompt means the audio alone is the instruction.

``domain`` says what the audio is: ``speech``, ``sound`` or ``music``. Sound, music and emotion corpora are
therefore ``classify`` or ``caption`` tasks over the ``sound``/``music``/``speech`` domains rather than tasks
of their own: the shard format only needs to know the shape of the chat, not the kind of audio.

Honesty note: ``hours`` and ``license`` are the figures published by the corpus authors (paper, homepage or
dataset card) as known when this file was written, rounded; ``hours_estimated=True`` marks sizes that were
not published in hours and are estimated from clip counts times typical clip length. HF ids, configs, split
names and column names are those of the public dataset cards; repositories change (gating, renames, removal
of loading scripts -- ``datasets>=4`` no longer runs them; pass ``revision=refs/convert/parquet`` to
``prepare`` for such repositories), so check the card before a large run. Licences of the audio itself often
differ from the annotations' (YouTube, Freesound, ...); ``notes`` says so where it matters. Nothing here is
legal advice.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.errors import UnknownNameError

TASKS: tuple[str, ...] = ("asr", "caption", "aqa", "classify", "instruct")
"""Allowed values of :attr:`CorpusSpec.task`."""

DOMAINS: tuple[str, ...] = ("speech", "sound", "music")
"""Allowed values of :attr:`CorpusSpec.domain`."""

SOURCES: tuple[str, ...] = ("hf", "folder")
"""Allowed values of :attr:`CorpusSpec.source`."""

COLUMN_FIELDS: tuple[str, ...] = ("audio", "text", "question", "id")
"""Our sample fields that :attr:`CorpusSpec.columns` may map to dataset columns (``answer`` is ``text``)."""


TABLE_FORMATS: tuple[str, ...] = ("auto", "csv", "tsv", "json", "jsonl", "lines")
"""Allowed values of :attr:`FolderTable.format` (``auto``: by the metadata file's suffix)."""


def template_fields(template: str) -> set[str]:
    """Column names a :meth:`str.format` template refers to, e.g. ``{"youtube_id"}`` for ``"Y{youtube_id}"``.

    Args:
        template: the template.

    Returns:
        The field names (attribute/index access and format specs stripped).

    Raises:
        ValueError: on a malformed template or a positional field (``"{}"``, ``"{0}"``).
    """
    names = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise ValueError(f"template {template!r} has a positional field; name the column")
        names.add(base)
    return names


@dataclass(frozen=True)
class FolderTable:
    """A *table* folder layout: metadata file(s) listing the clips + audio files, read by one generic reader.

    Each metadata row (CSV/TSV with or without a header, a JSON list, a JSON object of row objects, JSON
    Lines, or text lines parsed with a regex) becomes one sample, or one per column of ``text`` when it names
    several (multi-caption corpora; keys get ``_c1``, ``_c2``, ... suffixes). Templates are :meth:`str.format`
    strings over the row's columns; an integer format spec (``"{start:06d}"``) converts numeric text. Audio
    candidates are looked up in an index of the audio files (``.wav .flac .mp3 .ogg .opus .aif(f) .au``) below
    the audio folders, by relative path, by file name, then by stem (the name without its audio extension),
    so the extension of downloaded clips does not matter. A row whose audio is not found is rejected as
    ``missing_audio``.

    Attributes:
        metadata: our split -> glob (relative to the source folder) of that split's metadata file(s); several
            matches are read in sorted path order. With ``audio=()`` the glob matches the audio files
            themselves and ``filename_regex`` turns each name into columns (labels encoded in file names).
        audio: templates of the audio file name, stem or relative path, tried in order (first found wins);
            ``()``: rows are audio files (see ``metadata``).
        text: column(s) of the assistant's reply (transcript, caption, answer or label). Several columns: one
            sample per column, in order, key suffix ``_c<i>`` (1-based).
        question: column of the question (``aqa``) or instruction text (``instruct``).
        key: template of the sample key; default: the file name of the first ``audio`` template without an
            audio extension (the file stem with ``audio=()``). Characters outside ``[A-Za-z0-9_-]`` become
            ``_``; a key seen before in the split gets ``_2``, ``_3``, ... (e.g. several questions per clip).
        audio_dirs: our split -> glob of the folder(s) holding that split's audio; default: the whole source
            folder. Needed where clip names repeat across splits (e.g. MELD).
        format: metadata format, one of :data:`TABLE_FORMATS`; ``auto`` picks by suffix (``.csv``, ``.tsv``,
            ``.json``, ``.jsonl``), else ``lines`` if ``line_regex`` is set.
        fieldnames: column names of a header-less CSV/TSV; ``None``: the first row is the header.
        comment: CSV/TSV lines starting with this prefix are skipped (e.g. AudioSet's ``#`` header lines).
        json_field: key of the row list in a JSON object (e.g. WavCaps' ``"data"``); without it a JSON object
            of objects gives one row per value with the object's key in column ``_key``.
        line_regex: regex applied to every line of a ``lines`` file; its named groups are the columns, lines
            that do not match are skipped.
        filename_regex: with ``audio=()``: regex matched against each audio file's name; named groups are the
            columns (plus ``_stem``), files that do not match are skipped.
        split_filter: our split -> ``(column, allowed values)``; rows of that split's metadata whose stripped
            value is not allowed are skipped (e.g. VGGSound's ``train``/``test`` column).
        label_sep: split the text value at this separator into several labels (multi-label corpora); a
            ``classify`` sample joins them with ``", "``.
        label_map: raw label -> label text; ``None`` values mark labels that carry no usable class, rejected
            as ``unlabelled`` (e.g. IEMOCAP ``xxx``). Unmapped labels are kept verbatim.
        label_file: ``(glob, key column, name column)`` of a CSV mapping raw labels to names (e.g. AudioSet
            machine ids to display names), applied before ``label_map``.
        notes: where the layout is a best guess rather than verified against the release.
    """

    metadata: Mapping[str, str] = field(hash=False)
    text: tuple[str, ...]
    audio: tuple[str, ...] = ()
    question: str | None = None
    key: str | None = None
    audio_dirs: Mapping[str, str] = field(default_factory=dict, hash=False)
    format: str = "auto"
    fieldnames: tuple[str, ...] | None = None
    comment: str | None = None
    json_field: str | None = None
    line_regex: str | None = None
    filename_regex: str | None = None
    split_filter: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict, hash=False)
    label_sep: str | None = None
    label_map: Mapping[str, str | None] = field(default_factory=dict, hash=False)
    label_file: tuple[str, str, str] | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        """Validate the layout.

        Raises:
            ValueError: on no splits, a bad split name, no text column, ``audio=()`` without
                ``filename_regex``, an unknown format, a ``lines`` format without ``line_regex``, a regex that
                does not compile, a malformed template, or filters/audio folders of unknown splits.
        """
        problems = []
        if not self.metadata:
            problems.append("metadata must name at least one split")
        bad_splits = [s for s in self.metadata if not s or not re.fullmatch(r"[A-Za-z0-9_-]+", s)]
        if bad_splits:
            problems.append(f"split names must match [A-Za-z0-9_-]+, got {bad_splits}")
        if not self.text or not all(self.text):
            problems.append("text must name at least one column")
        if not self.audio and not self.filename_regex:
            problems.append("audio=() (rows are audio files) needs filename_regex")
        if self.format not in TABLE_FORMATS:
            problems.append(f"format {self.format!r} not in {TABLE_FORMATS}")
        if self.format == "lines" and not self.line_regex:
            problems.append("format 'lines' needs line_regex")
        for name in ("line_regex", "filename_regex"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    problems.append(f"{name} does not compile: {err}")
        for template in (*self.audio, *([self.key] if self.key else [])):
            try:
                template_fields(template)
            except ValueError as err:
                problems.append(str(err))
        for name in ("split_filter", "audio_dirs"):
            unknown = sorted(set(getattr(self, name)) - set(self.metadata))
            if unknown:
                problems.append(f"{name} has splits {unknown} without metadata")
        if problems:
            raise ValueError("invalid folder table: " + "; ".join(problems))

    def columns_used(self, split: str) -> set[str]:
        """Columns every metadata row of ``split`` must have.

        Args:
            split: our split name.

        Returns:
            The text and question columns, the template fields and the split filter's column.
        """
        used = set(self.text) | ({self.question} if self.question else set())
        for template in (*self.audio, *([self.key] if self.key else [])):
            used |= template_fields(template)
        if split in self.split_filter:
            used.add(self.split_filter[split][0])
        return used


@dataclass(frozen=True)
class CorpusSpec:
    """One public corpus.

    Attributes:
        name: registry key, also the shard prefix; ``[a-z0-9_]`` only.
        task: one of :data:`TASKS`.
        domain: one of :data:`DOMAINS`.
        source: preferred source kind, ``"hf"`` (needs ``hf_id``) or ``"folder"`` (needs ``folder_layout``).
            An entry may have both; ``prepare`` picks by what ``source=`` points at.
        hf_id: HF hub dataset id, e.g. ``"openslr/librispeech_asr"``; ``None`` if the audio is not on the hub.
        hf_config: dataset config name passed to ``datasets.load_dataset`` (``None`` for the default).
        hf_splits: our split name (``train``, ``validation``, ``test``, ...) -> HF split expression
            (``"train.clean.100+train.clean.360"`` concatenates splits).
        columns: our field (``audio``, ``text``, optional ``question``, ``id``) -> dataset column name.
            ``text`` is the assistant's reply: transcript, caption, answer or label.
        folder_layout: name of the official folder layout (``"librispeech"``, ...), or ``None``.
        folder_table: how to read a *table* folder layout (metadata file(s) + audio files), or ``None`` for
            layouts with a dedicated reader (LibriSpeech) or without one yet.
        license: SPDX identifier where one exists, else a ``LicenseRef-...`` or ``NOASSERTION`` string.
        hours: audio size in hours (published figure, see the module docstring), > 0.
        prompts: default user instructions; samples rotate through them by input index. ``aqa`` prompts
            contain ``{question}``; an ``instruct`` prompt may be ``""`` (audio only).
        url: homepage or paper.
        language: ISO 639-1 code of the speech (``"en"``), ``"und"`` for non-speech audio.
        hours_estimated: ``hours`` is an estimate (clips x typical length), not a published figure.
        notes: caveats (gating, audio licence, text normalisation, ...).
    """

    name: str
    task: str
    domain: str
    source: str
    license: str
    hours: float
    prompts: tuple[str, ...]
    url: str
    hf_id: str | None = None
    hf_config: str | None = None
    hf_splits: Mapping[str, str] = field(default_factory=dict, hash=False)
    columns: Mapping[str, str] = field(default_factory=dict, hash=False)
    folder_layout: str | None = None
    folder_table: FolderTable | None = field(default=None, hash=False)
    language: str = "en"
    hours_estimated: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        """Validate the entry.

        Raises:
            ValueError: on an unknown task, domain or source kind, a source kind without its id/layout, an HF
                entry without ``audio``/``text`` columns, an unknown column field, ``hours <= 0``, no prompts,
                prompts that do not fit the task, or a ``folder_table`` without layout name (or, for ``aqa``,
                without question column).
        """
        problems = []
        if (
            not self.name
            or not all(c.isalnum() or c == "_" for c in self.name)
            or self.name != self.name.lower()
        ):
            problems.append(f"name must be lower-case [a-z0-9_], got {self.name!r}")
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} not in {TASKS}")
        if self.domain not in DOMAINS:
            problems.append(f"domain {self.domain!r} not in {DOMAINS}")
        if self.source not in SOURCES:
            problems.append(f"source {self.source!r} not in {SOURCES}")
        if self.source == "hf" and not self.hf_id:
            problems.append("source 'hf' needs hf_id")
        if self.source == "folder" and not self.folder_layout:
            problems.append("source 'folder' needs folder_layout")
        if self.folder_table is not None:
            if not self.folder_layout:
                problems.append("folder_table needs folder_layout")
            if self.task == "aqa" and not self.folder_table.question:
                problems.append("an aqa folder_table needs a question column")
        if self.hf_id and not {"audio", "text"} <= set(self.columns):
            problems.append(f"an HF entry needs 'audio' and 'text' columns, got {dict(self.columns)}")
        unknown = sorted(set(self.columns) - set(COLUMN_FIELDS))
        if unknown:
            problems.append(f"unknown column fields {unknown} (allowed: {COLUMN_FIELDS})")
        if not self.hours > 0:
            problems.append(f"hours must be > 0, got {self.hours}")
        if not self.prompts:
            problems.append("prompts must not be empty")
        if self.task == "aqa" and not all("{question}" in p for p in self.prompts):
            problems.append("aqa prompts must contain '{question}'")
        if self.task != "instruct" and not all(p.strip() for p in self.prompts):
            problems.append("only instruct prompts may be empty")
        if problems:
            raise ValueError(f"invalid corpus {self.name!r}: " + "; ".join(problems))

    @property
    def source_label(self) -> str:
        """Short description of the preferred source, e.g. ``"hf:openslr/librispeech_asr"``."""
        if self.source == "hf":
            return f"hf:{self.hf_id}" + (f" ({self.hf_config})" if self.hf_config else "")
        return f"folder:{self.folder_layout}"


_CAPTION_PROMPTS = ("Describe the audio.", "Write a one-sentence caption for this audio clip.")
_MUSIC_CAPTION_PROMPTS = ("Describe the music.", "Write a short description of this piece of music.")
_AQA_PROMPTS = ("{question}",)
_SOUND_EVENT_PROMPTS = ("Which sound events can be heard in this audio? Answer with their labels.",)
_EMOTION_PROMPTS = ("What emotion does the speaker express? Answer with one word.",)
_ASR = (DEFAULT_ASR_PROMPT,)
_STD_SPLITS = {"train": "train", "validation": "validation", "test": "test"}

# IEMOCAP's categorical codes (EmoEvaluation summary lines); "xxx" (no majority) and "oth" carry no class.
_IEMOCAP_LABELS: dict[str, str | None] = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "excited",
    "sad": "sad",
    "ang": "angry",
    "fru": "frustrated",
    "fea": "fearful",
    "sur": "surprised",
    "dis": "disgusted",
    "oth": None,
    "xxx": None,
}
_CREMA_D_LABELS = {
    "ANG": "angry",
    "DIS": "disgusted",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}

_ENTRIES: tuple[CorpusSpec, ...] = (
    # ------------------------------------------------------------------------------------------ ASR
    CorpusSpec(
        name="librispeech",
        task="asr",
        domain="speech",
        source="folder",
        folder_layout="librispeech",
        hf_id="openslr/librispeech_asr",
        hf_config="all",
        hf_splits={
            "train": "train.clean.100+train.clean.360+train.other.500",
            "validation": "validation.clean",
            "validation_other": "validation.other",
            "test": "test.clean",
            "test_other": "test.other",
            # the official subset names, as the folder layout and conf/data/librispeech.yaml name the splits
            "train-clean-100": "train.clean.100",
            "train-clean-360": "train.clean.360",
            "train-other-500": "train.other.500",
            "dev-clean": "validation.clean",
            "dev-other": "validation.other",
            "test-clean": "test.clean",
            "test-other": "test.other",
        },
        columns={"audio": "audio", "text": "text", "id": "id"},
        license="CC-BY-4.0",
        hours=960.0,
        prompts=_ASR,
        url="https://www.openslr.org/12",
        notes="Transcripts are upper-case without punctuation.",
    ),
    CorpusSpec(
        name="gigaspeech",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="speechcolab/gigaspeech",
        hf_config="xl",
        hf_splits=_STD_SPLITS,
        columns={"audio": "audio", "text": "text", "id": "segment_id"},
        license="Apache-2.0",
        hours=10000.0,
        prompts=_ASR,
        url="https://github.com/SpeechColab/GigaSpeech",
        notes="Gated (terms of access). Text is upper-case with punctuation tags (<COMMA>, <PERIOD>, ...) and "
        "garbage segments (<SIL>, <MUSIC>, <NOISE>, <OTHER>); normalise before training. Audio: podcasts, "
        "YouTube, audiobooks under their owners' terms.",
    ),
    CorpusSpec(
        name="peoples_speech",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="MLCommons/peoples_speech",
        hf_config="clean",
        hf_splits=_STD_SPLITS,
        columns={"audio": "audio", "text": "text", "id": "id"},
        license="CC-BY-SA-4.0",
        hours=30000.0,
        prompts=_ASR,
        url="https://mlcommons.org/datasets/peoples-speech/",
        notes="hours is the whole corpus (clean + dirty configs); the 'clean' config is a part of it. Some "
        "source audio is CC-BY-4.0 rather than CC-BY-SA-4.0.",
    ),
    CorpusSpec(
        name="common_voice_en",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="mozilla-foundation/common_voice_17_0",
        hf_config="en",
        hf_splits=_STD_SPLITS,
        columns={"audio": "audio", "text": "sentence", "id": "path"},
        license="CC0-1.0",
        hours=2600.0,
        prompts=_ASR,
        url="https://commonvoice.mozilla.org/en/datasets",
        notes="English validated hours of release 17.0 (approximate). Gated on the hub; if the hub copy is "
        "unavailable, download the release from Mozilla.",
    ),
    CorpusSpec(
        name="voxpopuli_en",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="facebook/voxpopuli",
        hf_config="en",
        hf_splits=_STD_SPLITS,
        columns={"audio": "audio", "text": "normalized_text", "id": "audio_id"},
        license="CC0-1.0",
        hours=543.0,
        prompts=_ASR,
        url="https://github.com/facebookresearch/voxpopuli",
        notes="English transcribed subset (European Parliament). normalized_text is lower-case.",
    ),
    CorpusSpec(
        name="spgispeech",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="kensho/spgispeech",
        hf_config="L",
        hf_splits=_STD_SPLITS,
        columns={"audio": "audio", "text": "transcript", "id": "wav_filename"},
        license="LicenseRef-Kensho-SPGISpeech-NonCommercial",
        hours=5000.0,
        prompts=_ASR,
        url="https://datasets.kensho.com/datasets/spgispeech",
        notes="Gated; non-commercial licence. Earnings calls, fully formatted (cased, punctuated) text.",
    ),
    CorpusSpec(
        name="tedlium3",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="LIUM/tedlium",
        hf_config="release3",
        hf_splits=_STD_SPLITS,
        columns={"audio": "audio", "text": "text", "id": "id"},
        folder_layout="tedlium",
        license="CC-BY-NC-ND-3.0",
        hours=452.0,
        prompts=_ASR,
        url="https://www.openslr.org/51",
        notes="Drop segments whose text is 'ignore_time_segment_in_scoring'. Official folder layout is "
        "SPH audio + STM transcripts.",
    ),
    CorpusSpec(
        name="ami_ihm",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="edinburghcstr/ami",
        hf_config="ihm",
        hf_splits=_STD_SPLITS,
        columns={"audio": "audio", "text": "text", "id": "audio_id"},
        license="CC-BY-4.0",
        hours=100.0,
        prompts=_ASR,
        url="https://groups.inf.ed.ac.uk/ami/corpus/",
        notes="hours is the whole meeting corpus; individual headset microphones (ihm) config.",
    ),
    CorpusSpec(
        name="mls_en",
        task="asr",
        domain="speech",
        source="hf",
        hf_id="parler-tts/mls_eng",
        hf_splits={"train": "train", "validation": "dev", "test": "test"},
        columns={"audio": "audio", "text": "transcript"},
        folder_layout="mls",
        folder_table=FolderTable(  # mls_english/<split>/{transcripts.txt: "<id>\t<text>", audio/**/<id>.flac}
            metadata={
                "train": "train/transcripts.txt",
                "validation": "dev/transcripts.txt",
                "test": "test/transcripts.txt",
            },
            line_regex=r"^(?P<id>[^\t]+)\t(?P<text>.*)$",
            audio=("{id}",),
            audio_dirs={"train": "train/audio", "validation": "dev/audio", "test": "test/audio"},
            text=("text",),
            key="{id}",
        ),
        license="CC-BY-4.0",
        hours=44500.0,
        prompts=_ASR,
        url="https://www.openslr.org/94",
        notes="English part of Multilingual LibriSpeech; facebook/multilingual_librispeech on the hub has no "
        "English config, parler-tts/mls_eng hosts it. Lower-case transcripts.",
    ),
    # -------------------------------------------------------------------------------------- caption
    CorpusSpec(
        name="audiocaps",
        task="caption",
        domain="sound",
        source="folder",
        folder_layout="audiocaps",
        folder_table=FolderTable(  # github.com/cdjkim/audiocaps dataset/{train,val,test}.csv
            metadata={"train": "train.csv", "validation": "val.csv", "test": "test.csv"},
            audio=("{youtube_id}", "Y{youtube_id}", "{youtube_id}_{start_time:d}", "{audiocap_id}"),
            text=("caption",),
            key="{audiocap_id}",
            notes="Audio is downloaded by the user; clips named by YouTube id (optionally 'Y' + id or "
            "'<id>_<start>') or by audiocap_id, any audio extension, anywhere below the folder.",
        ),
        license="MIT",
        hours=142.0,
        hours_estimated=True,
        prompts=_CAPTION_PROMPTS,
        url="https://audiocaps.github.io/",
        language="und",
        notes="~51k 10-s AudioSet clips; captions MIT, audio must be fetched from YouTube (AudioSet terms).",
    ),
    CorpusSpec(
        name="clotho",
        task="caption",
        domain="sound",
        source="folder",
        folder_layout="clotho",
        folder_table=FolderTable(  # Clotho v2.1 (Zenodo): clotho_captions_<split>.csv + <split>/<file_name>
            metadata={
                "train": "clotho_captions_development.csv",
                "validation": "clotho_captions_validation.csv",
                "test": "clotho_captions_evaluation.csv",
            },
            audio=("{file_name}",),
            text=tuple(f"caption_{i}" for i in range(1, 6)),
        ),
        license="LicenseRef-Tampere-University",
        hours=44.0,
        hours_estimated=True,
        prompts=_CAPTION_PROMPTS,
        url="https://zenodo.org/records/4783391",
        language="und",
        notes="Clotho v2.1: 6,974 Freesound clips of 15-30 s with 5 captions each; audio under Freesound "
        "CC licences.",
    ),
    CorpusSpec(
        name="wavcaps",
        task="caption",
        domain="sound",
        source="folder",
        folder_layout="wavcaps",
        folder_table=FolderTable(  # cvssp/WavCaps: json_files/<source>/<x>_final.json + unzipped Zip_files/
            metadata={"train": "json_files/*/*_final.json"},
            json_field="data",
            audio=("{id}",),
            text=("caption",),
            notes="Ids are only unique within one source (AudioSet_SL, BBC, FreeSound, SoundBible); the four "
            "sources' clips are looked up by id across the whole folder. json_files/blacklist/ (clips "
            "overlapping AudioCaps/Clotho evaluation sets) is not applied.",
        ),
        license="LicenseRef-WavCaps-Academic",
        hours=7568.0,
        prompts=_CAPTION_PROMPTS,
        url="https://huggingface.co/datasets/cvssp/WavCaps",
        language="und",
        notes="403k ChatGPT-assisted captions of FreeSound, BBC Sound Effects, SoundBible and AudioSet "
        "clips; academic use only. The hub repo holds zip archives + JSON, not a loadable audio dataset.",
    ),
    CorpusSpec(
        name="musiccaps",
        task="caption",
        domain="music",
        source="folder",
        folder_layout="musiccaps",
        folder_table=FolderTable(  # google/MusicCaps musiccaps-public.csv; eval subset = is_audioset_eval
            metadata={
                "train": "musiccaps-public.csv",
                "test": "musiccaps-public.csv",
                "all": "musiccaps-public.csv",
            },
            split_filter={
                "train": ("is_audioset_eval", ("False", "false", "0")),
                "test": ("is_audioset_eval", ("True", "true", "1")),
            },
            audio=("{ytid}", "Y{ytid}", "{ytid}_{start_s:d}", "[{ytid}]-[{start_s}-{end_s}]"),
            text=("caption",),
            key="{ytid}",
        ),
        license="CC-BY-SA-4.0",
        hours=15.3,
        prompts=_MUSIC_CAPTION_PROMPTS,
        url="https://huggingface.co/datasets/google/MusicCaps",
        language="und",
        notes="5,521 10-s clips; the hub dataset is metadata only (ytid, start_s, caption), audio must be "
        "fetched from YouTube.",
    ),
    # ------------------------------------------------------------------------------------------ AQA
    CorpusSpec(
        name="clotho_aqa",
        task="aqa",
        domain="sound",
        source="folder",
        folder_layout="clotho_aqa",
        folder_table=FolderTable(  # Zenodo 6473207: clotho_aqa_{train,val,test}.csv + audio_files/
            metadata={
                "train": "clotho_aqa_train.csv",
                "validation": "clotho_aqa_val.csv",
                "test": "clotho_aqa_test.csv",
            },
            audio=("{file_name}",),
            text=("answer",),
            question="QuestionText",
            notes="Each question has three annotators' answers (three rows): one sample per row.",
        ),
        license="NOASSERTION",
        hours=12.4,
        hours_estimated=True,
        prompts=_AQA_PROMPTS,
        url="https://zenodo.org/records/6473207",
        language="und",
        notes="1,991 Clotho clips with 35,838 crowd-sourced question/answer pairs (yes/no and one-word).",
    ),
    CorpusSpec(
        name="openaqa",
        task="aqa",
        domain="sound",
        source="folder",
        folder_layout="openaqa",
        folder_table=FolderTable(  # LTU openaqa_5.6M.json: [{"instruction", "audio_id", "output", ...}]
            metadata={"train": "openaqa_5.6M.json"},
            audio=("{audio_id}",),
            text=("output",),
            question="instruction",
            notes="audio_id is a path on the authors' cluster; clips are looked up by file name / stem below "
            "the folder, so gather the source corpora's audio there. Fields as in LTU's data scripts; the "
            "'input' field is ignored. The 2.3 GB JSON is loaded whole.",
        ),
        license="NOASSERTION",
        hours=2350.0,
        hours_estimated=True,
        prompts=_AQA_PROMPTS,
        url="https://github.com/YuanGongND/ltu",
        language="und",
        notes="OpenAQA-5M (LTU): 5.6M closed- and open-ended QA pairs over ~845k clips of AudioSet, VGGSound, "
        "FSD50K, AudioCaps, Clotho, ...; audio under the source corpora's terms.",
    ),
    # ----------------------------------------------------------------------------- sound events
    CorpusSpec(
        name="audioset",
        task="classify",
        domain="sound",
        source="folder",
        folder_layout="audioset",
        folder_table=FolderTable(  # *_segments.csv: 3 '#' lines, then YTID, start, end, "mid,mid,..."
            metadata={
                "train": "*train_segments.csv",
                "balanced_train": "balanced_train_segments.csv",
                "unbalanced_train": "unbalanced_train_segments.csv",
                "test": "eval_segments.csv",
            },
            fieldnames=("YTID", "start_seconds", "end_seconds", "positive_labels"),
            comment="#",
            audio=("Y{YTID}", "{YTID}", "{YTID}_{start_seconds:d}", "{YTID}_{start_seconds:06d}"),
            text=("positive_labels",),
            key="{YTID}",
            label_sep=",",
            label_file=("class_labels_indices.csv", "mid", "display_name"),
        ),
        license="CC-BY-4.0",
        hours=5800.0,
        prompts=_SOUND_EVENT_PROMPTS,
        url="https://research.google.com/audioset/",
        language="und",
        notes="~2.1M 10-s YouTube segments, 527 labels; labels CC-BY-4.0, audio from YouTube.",
    ),
    CorpusSpec(
        name="vggsound",
        task="classify",
        domain="sound",
        source="folder",
        folder_layout="vggsound",
        folder_table=FolderTable(  # vggsound.csv, no header: youtube_id, start_seconds, label, train/test
            metadata={"train": "vggsound.csv", "test": "vggsound.csv"},
            fieldnames=("youtube_id", "start_seconds", "label", "split"),
            comment="#",
            split_filter={"train": ("split", ("train",)), "test": ("split", ("test",))},
            audio=("{youtube_id}_{start_seconds:06d}", "{youtube_id}_{start_seconds:d}", "{youtube_id}"),
            text=("label",),
            key="{youtube_id}_{start_seconds:06d}",
            notes="The release is video: extract the audio next to the clips (e.g. <id>_<start:06d>.wav).",
        ),
        license="CC-BY-4.0",
        hours=550.0,
        prompts=("What is the source of the sound in this clip? Answer with one label.",),
        url="https://www.robots.ox.ac.uk/~vgg/data/vggsound/",
        language="und",
        notes="~200k 10-s YouTube clips, 309 classes; audio from YouTube.",
    ),
    CorpusSpec(
        name="esc50",
        task="classify",
        domain="sound",
        source="hf",
        hf_id="ashraq/esc50",
        hf_splits={"train": "train"},
        columns={"audio": "audio", "text": "category", "id": "filename"},
        folder_layout="esc50",
        folder_table=FolderTable(  # github.com/karolpiczak/ESC-50: meta/esc50.csv + audio/<filename>
            metadata={"train": "meta/esc50.csv", **{f"fold{i}": "meta/esc50.csv" for i in range(1, 6)}},
            split_filter={f"fold{i}": ("fold", (str(i),)) for i in range(1, 6)},
            audio=("{filename}",),
            text=("category",),
        ),
        license="CC-BY-NC-3.0",
        hours=2.8,
        prompts=("What is the sound in this clip? Answer with one label.",),
        url="https://github.com/karolpiczak/ESC-50",
        language="und",
        notes="2,000 5-s clips, 50 classes, 5 folds (column 'fold'); hold out a fold for evaluation.",
    ),
    CorpusSpec(
        name="fsd50k",
        task="classify",
        domain="sound",
        source="folder",
        folder_layout="fsd50k",
        folder_table=FolderTable(  # FSD50K.ground_truth/{dev,eval}.csv: fname,labels,mids[,split]
            metadata={
                "train": "FSD50K.ground_truth/dev.csv",
                "validation": "FSD50K.ground_truth/dev.csv",
                "test": "FSD50K.ground_truth/eval.csv",
            },
            split_filter={"train": ("split", ("train",)), "validation": ("split", ("val",))},
            audio=("{fname}",),
            text=("labels",),
            key="{fname}",
            label_sep=",",
        ),
        license="CC-BY-4.0",
        hours=108.3,
        prompts=_SOUND_EVENT_PROMPTS,
        url="https://zenodo.org/records/4060432",
        language="und",
        notes="51,197 Freesound clips, 200 AudioSet-ontology labels; clip licences vary (CC0, CC-BY, CC-BY-NC).",
    ),
    # ------------------------------------------------------------------------------------- music
    CorpusSpec(
        name="gtzan",
        task="classify",
        domain="music",
        source="hf",
        hf_id="marsyas/gtzan",
        hf_config="all",
        hf_splits={"train": "train"},
        columns={"audio": "audio", "text": "genre", "id": "file"},
        license="NOASSERTION",
        hours=8.3,
        prompts=("What is the genre of this music? Answer with one word.",),
        url="http://marsyas.info/index.html",
        language="und",
        notes="1,000 30-s excerpts, 10 genres (ClassLabel); research use, clip copyright unclear. "
        "Script-based repository: use revision=refs/convert/parquet with datasets>=4.",
    ),
    CorpusSpec(
        name="nsynth",
        task="classify",
        domain="music",
        source="folder",
        folder_layout="nsynth",
        folder_table=FolderTable(  # nsynth-<split>/examples.json ({note_str: {...}}) + nsynth-<split>/audio/
            metadata={
                "train": "nsynth-train/examples.json",
                "validation": "nsynth-valid/examples.json",
                "test": "nsynth-test/examples.json",
            },
            audio=("{note_str}",),
            audio_dirs={"train": "nsynth-train", "validation": "nsynth-valid", "test": "nsynth-test"},
            text=("instrument_family_str",),
            key="{note_str}",
        ),
        license="CC-BY-4.0",
        hours=340.0,
        prompts=("Which instrument family plays this note? Answer with one word.",),
        url="https://magenta.tensorflow.org/datasets/nsynth",
        language="und",
        notes="305,979 4-s notes; label = instrument family (11 classes).",
    ),
    # ----------------------------------------------------------------------------------- emotion
    CorpusSpec(
        name="iemocap",
        task="classify",
        domain="speech",
        source="folder",
        folder_layout="iemocap",
        folder_table=FolderTable(  # IEMOCAP_full_release/SessionN/dialog/EmoEvaluation/<dialog>.txt
            metadata={
                "train": "Session*/dialog/EmoEvaluation/*.txt",
                **{f"session{i}": f"Session{i}/dialog/EmoEvaluation/*.txt" for i in range(1, 6)},
            },
            line_regex=r"^\[(?P<start>[\d.]+) - (?P<end>[\d.]+)\]\t(?P<utterance>\S+)\t(?P<emotion>\w+)\t",
            audio=("{utterance}",),
            audio_dirs={
                "train": "Session*/sentences/wav",
                **{f"session{i}": f"Session{i}/sentences/wav" for i in range(1, 6)},
            },
            text=("emotion",),
            key="{utterance}",
            label_map=_IEMOCAP_LABELS,
            notes="Summary-line format '[start - end]\\t<utterance>\\t<code>\\t[V, A, D]' from memory of the "
            "release; 'xxx' (no majority) and 'oth' are rejected as unlabelled. session<N> splits allow "
            "leave-one-session-out evaluation.",
        ),
        license="LicenseRef-IEMOCAP-Release-Agreement",
        hours=12.0,
        prompts=_EMOTION_PROMPTS,
        url="https://sail.usc.edu/iemocap/",
        notes="Dyadic acted sessions; available on request for research (release agreement).",
    ),
    CorpusSpec(
        name="meld",
        task="classify",
        domain="speech",
        source="folder",
        folder_layout="meld",
        folder_table=FolderTable(  # MELD.Raw: <split>_sent_emo.csv + per-split folders of dia<D>_utt<U>.mp4
            metadata={
                "train": "**/train_sent_emo.csv",
                "validation": "**/dev_sent_emo.csv",
                "test": "**/test_sent_emo.csv",
            },
            audio=("dia{Dialogue_ID}_utt{Utterance_ID}",),
            audio_dirs={
                "train": "**/train_splits",
                "validation": "**/dev_splits_complete",
                "test": "**/output_repeated_splits_test",
            },
            text=("Emotion",),
            key="dia{Dialogue_ID}_utt{Utterance_ID}",
            notes="Ids restart per split, hence per-split audio folders (names as in MELD.Raw's tarballs, "
            "from memory). The clips are mp4: extract audio next to them (dia0_utt0.mp4 -> dia0_utt0.wav).",
        ),
        license="GPL-3.0-only",
        hours=12.0,
        hours_estimated=True,
        prompts=_EMOTION_PROMPTS,
        url="https://affective-meld.github.io/",
        notes="~13.7k utterances from the TV series Friends, 7 emotions; audio must be extracted from the "
        "released video clips.",
    ),
    CorpusSpec(
        name="crema_d",
        task="classify",
        domain="speech",
        source="folder",
        folder_layout="crema_d",
        folder_table=FolderTable(  # AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav, no metadata file
            metadata={"train": "**/*.wav"},
            filename_regex=r"^(?P<actor>\d+)_(?P<sentence>[A-Z]+)_(?P<emotion>[A-Z]{3})_(?P<level>\w+)\.wav$",
            text=("emotion",),
            label_map=_CREMA_D_LABELS,
        ),
        license="ODbL-1.0",
        hours=5.3,
        hours_estimated=True,
        prompts=_EMOTION_PROMPTS,
        url="https://github.com/CheyneyComputerScience/CREMA-D",
        notes="7,442 acted clips from 91 actors, 6 emotions (label in the file name).",
    ),
    # ------------------------------------------------------------------------------ instructions
    CorpusSpec(
        name="voiceassistant_400k",
        task="instruct",
        domain="speech",
        source="hf",
        hf_id="gpt-omni/VoiceAssistant-400K",
        hf_splits={"train": "train"},
        columns={"audio": "question_audio", "text": "answer", "question": "question"},
        license="NOASSERTION",
        hours=650.0,
        hours_estimated=True,
        prompts=("",),
        url="https://github.com/gpt-omni/mini-omni",
        notes="Synthetic (TTS) spoken questions with assistant answers (Mini-Omni); 'question' is the text of "
        "the spoken instruction and is stored as 'instruction_text'.",
    ),
    CorpusSpec(
        name="instructs2s_200k",
        task="instruct",
        domain="speech",
        source="folder",
        folder_layout="instructs2s",
        license="NOASSERTION",
        hours=400.0,
        hours_estimated=True,
        prompts=("",),
        url="https://huggingface.co/datasets/ICTNLP/InstructS2S-200K",
        notes="LLaMA-Omni instructions rewritten for speech; the release is text, the speech must be "
        "synthesised with its TTS recipe.",
    ),
)

CORPORA: dict[str, CorpusSpec] = {spec.name: spec for spec in _ENTRIES}
"""All registered corpora by name, in registry order."""

if len(CORPORA) != len(_ENTRIES):  # pragma: no cover - guards against a duplicated name when editing
    raise RuntimeError("duplicate corpus names in the registry")


def get_corpus(name: str) -> CorpusSpec:
    """Look a corpus up by name.

    Args:
        name: registry key, e.g. ``"librispeech"``.

    Returns:
        The :class:`CorpusSpec`.

    Raises:
        KeyError: if ``name`` is not registered; the message lists the known names (an
            :class:`~aero_lightning.errors.UnknownNameError`).
    """
    try:
        return CORPORA[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}"
        ) from None


def _format_hours(spec: CorpusSpec) -> str:
    hours = f"{spec.hours:,.0f}" if spec.hours >= 100 else f"{spec.hours:g}"
    return f"~{hours}" if spec.hours_estimated else hours


def corpora_markdown_table() -> str:
    """Markdown table of the registry, one row per corpus in registry order.

    Columns: name, task (with the audio domain), preferred source, hours (``~`` marks an estimate) and licence.

    Returns:
        The table as a string ending with a newline.
    """
    lines = ["| Corpus | Task | Source | Hours | Licence |", "|---|---|---|---:|---|"]
    for spec in CORPORA.values():
        source = f"`{spec.source_label}`"
        lines.append(
            f"| [{spec.name}]({spec.url}) | {spec.task} ({spec.domain}) | {source} | {_format_hours(spec)} "
            f"| {spec.license} |"
        )
    return "\n".join(lines) + "\n"
