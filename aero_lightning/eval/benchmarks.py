"""Registry of evaluation benchmarks.

ASR test sets are those of the Open ASR Leaderboard, from its sorted test-only copy of the ESB datasets
(``hf-audio/esb-datasets-test-only-sorted``: one config per dataset, split ``test``, LibriSpeech ``test.clean`` /
``test.other``; columns ``audio`` and ``text``; https://github.com/huggingface/open_asr_leaderboard, e.g.
``transformers/run_whisper.sh``). Long-form LibriSpeech re-joins the test utterances of each chapter in utterance
order (Aero's long-form setting); it reads the official folder layout or ``openslr/librispeech_asr``, whose rows
carry ``speaker_id`` / ``chapter_id`` / ``id``. Audio question answering is scored as multiple-choice accuracy:
MMAU test-mini (``lmms-lab-audio/mmau``, split ``test_mini``: ``question``, ``choices`` as a JSON list, ``answer``
text, ``task``; lmms-eval ``tasks/mmau``) and AIR-Bench foundation (``lmms-lab/AIR_Bench``, config ``Foundation``,
splits ``sound`` / ``music`` / ``speech``: ``question``, ``choice_a``..``choice_d``, ``answer_gt`` text,
``task_name``; lmms-eval ``tasks/air_bench``).

Every benchmark can instead read a local source (``source=PATH`` in its config): a folder of prepared shards
(``manifest.json``), a folder written by ``datasets.save_to_disk``, a LibriSpeech-layout folder, or a JSON Lines
manifest (see :mod:`aero_lightning.eval.sources`). HF repositories change (gating, renames); check the dataset
card when a download fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.errors import UnknownNameError

__all__ = ["BENCHMARKS", "CHOICE_INSTRUCTION", "SUITES", "BenchmarkSpec", "get_benchmark"]

ESB_ID = "hf-audio/esb-datasets-test-only-sorted"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""Post-prompt of lmms-eval's MMAU and AIR-Bench foundation tasks."""

TASKS = ("asr", "choice")
LONGFORM = (None, "librispeech_chapter")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One evaluation set.

    Attributes:
        name: registry key (``[a-z0-9_]``).
        task: ``asr`` (WER) or ``choice`` (multiple-choice accuracy).
        description: one line for tables.
        hf_id: HF dataset id, or None when the set has no hub copy (local source only).
        hf_config: dataset config name.
        hf_split: split name.
        columns: field -> column. ``asr``: ``audio``, ``text``, optional ``id``. ``choice``: ``audio``,
            ``question``, ``answer``, ``choices`` (a list or JSON-list column) or ``choice_columns``, optional
            ``group`` and ``id``. Long-form LibriSpeech also ``speaker`` and ``chapter``.
        choice_columns: option columns in letter order (AIR-Bench's ``choice_a``..``choice_d``).
        answer_format: how ``answer`` names the correct option: ``text`` (the option's text), ``letter``, ``index``.
        longform: ``librispeech_chapter`` re-joins utterances per chapter; None for utterance-level sets.
        prompt: default instruction (ASR) or the instruction appended after the options (choice).
        reference: published figure to print next to ours (Aero blog WER in %, or accuracy), or None.
        notes: caveats.
    """

    name: str
    task: str
    description: str
    hf_id: str | None = None
    hf_config: str | None = None
    hf_split: str = "test"
    columns: Mapping[str, str] = field(default_factory=dict, hash=False)
    choice_columns: tuple[str, ...] = ()
    answer_format: str = "text"
    longform: str | None = None
    prompt: str = DEFAULT_ASR_PROMPT
    reference: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} not in {TASKS}")
        if self.longform not in LONGFORM:
            problems.append(f"longform {self.longform!r} not in {LONGFORM}")
        if self.answer_format not in ("text", "letter", "index"):
            problems.append(f"answer_format {self.answer_format!r} not in ('text', 'letter', 'index')")
        if self.task == "choice" and not ({"question", "answer"} <= set(self.columns)):
            problems.append("a choice benchmark needs question and answer columns")
        if self.task == "choice" and "choices" not in self.columns and not self.choice_columns:
            problems.append("a choice benchmark needs a choices column or choice_columns")
        if problems:
            raise ValueError(f"invalid benchmark {self.name!r}: " + "; ".join(problems))


_ASR_COLUMNS = {"audio": "audio", "text": "text", "id": "id"}


def _esb(name: str, config: str, split: str, description: str, reference: float | None, notes: str = ""):
    return BenchmarkSpec(
        name=name,
        task="asr",
        description=description,
        hf_id=ESB_ID,
        hf_config=config,
        hf_split=split,
        columns=_ASR_COLUMNS,
        reference=reference,
        notes=notes,
    )


_ENTRIES: tuple[BenchmarkSpec, ...] = (
    _esb("ami", "ami", "test", "AMI meetings (IHM), Open ASR Leaderboard", 10.53),
    _esb("earnings22", "earnings22", "test", "Earnings-22 earnings calls, Open ASR Leaderboard", 13.79),
    _esb("gigaspeech", "gigaspeech", "test", "GigaSpeech podcasts / YouTube, Open ASR Leaderboard", None),
    _esb("librispeech_test_clean", "librispeech", "test.clean", "LibriSpeech test-clean", 1.49),
    _esb("librispeech_test_other", "librispeech", "test.other", "LibriSpeech test-other", 3.17),
    _esb("spgispeech", "spgispeech", "test", "SPGISpeech financial calls, Open ASR Leaderboard", 1.97),
    _esb("tedlium", "tedlium", "test", "TED-LIUM 3 talks, Open ASR Leaderboard", 2.87),
    _esb("voxpopuli", "voxpopuli", "test", "VoxPopuli European Parliament (en), Open ASR Leaderboard", None),
    BenchmarkSpec(
        name="librispeech_longform_test_clean",
        task="asr",
        description="LibriSpeech test-clean, utterances re-joined per chapter",
        hf_id="openslr/librispeech_asr",
        hf_config="all",
        hf_split="test.clean",
        columns={**_ASR_COLUMNS, "speaker": "speaker_id", "chapter": "chapter_id"},
        longform="librispeech_chapter",
        reference=5.31,
        notes="Chapters of test-clean last minutes (one LLM context each); a local LibriSpeech/test-clean folder "
        "(source=PATH) avoids the download.",
    ),
    BenchmarkSpec(
        name="librispeech_longform_test_other",
        task="asr",
        description="LibriSpeech test-other, utterances re-joined per chapter",
        hf_id="openslr/librispeech_asr",
        hf_config="all",
        hf_split="test.other",
        columns={**_ASR_COLUMNS, "speaker": "speaker_id", "chapter": "chapter_id"},
        longform="librispeech_chapter",
        reference=11.71,
    ),
    BenchmarkSpec(
        name="mmau_test_mini",
        task="choice",
        description="MMAU test-mini (sound, music, speech reasoning), multiple choice",
        hf_id="lmms-lab-audio/mmau",
        hf_split="test_mini",
        columns={
            "audio": "audio",
            "question": "question",
            "choices": "choices",
            "answer": "answer",
            "group": "task",
        },
        prompt=CHOICE_INSTRUCTION,
        notes="lmms-eval picks a random letter for unparsed replies; we score them wrong and count them.",
    ),
    *(
        BenchmarkSpec(
            name=f"air_bench_foundation_{part}",
            task="choice",
            description=f"AIR-Bench foundation ({part}), multiple choice",
            hf_id="lmms-lab/AIR_Bench",
            hf_config="Foundation",
            hf_split=part,
            columns={"audio": "audio", "question": "question", "answer": "answer_gt", "group": "task_name"},
            choice_columns=("choice_a", "choice_b", "choice_c", "choice_d"),
            prompt=CHOICE_INSTRUCTION,
        )
        for part in ("sound", "music", "speech")
    ),
    BenchmarkSpec(
        name="demo",
        task="asr",
        description="espeak-ng demo corpus, test split (local shards)",
        columns=_ASR_COLUMNS,
        notes="Built by `python -m aero_lightning.data.synth`; no hub copy.",
    ),
)

BENCHMARKS: dict[str, BenchmarkSpec] = {b.name: b for b in _ENTRIES}
"""Benchmark name -> spec."""

SUITES: dict[str, tuple[str, ...]] = {
    "open_asr": (
        "ami",
        "earnings22",
        "gigaspeech",
        "librispeech_test_clean",
        "librispeech_test_other",
        "spgispeech",
        "tedlium",
        "voxpopuli",
    ),
    "librispeech_longform": ("librispeech_longform_test_clean", "librispeech_longform_test_other"),
    "air_bench_foundation": tuple(f"air_bench_foundation_{p}" for p in ("sound", "music", "speech")),
}
"""Named groups of benchmarks (each has a ``conf/benchmark/<suite>.yaml``)."""


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registry entry ``name``.

    Raises:
        KeyError: for an unknown name (the message lists the known ones; an
            :class:`~aero_lightning.errors.UnknownNameError`).
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}"
        ) from None
