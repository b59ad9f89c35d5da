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

Audio understanding beyond multiple choice (tasks ``caption``, ``aqa``, ``classify``, ``instruct``; scored as in
:mod:`aero_lightning.metrics.caption`, :mod:`aero_lightning.metrics.text`, :mod:`aero_lightning.metrics.choice` and
:mod:`aero_lightning.metrics.judge`):

- Clotho-AQA test (``lmms-lab-audio/ClothoAQA``, config ``clotho_aqa``, split ``clotho_aqa_test_filtered``:
  ``audio``, ``question``, ``answer``; lmms-eval ``tasks/clotho_aqa``, which moved it from ``lmms-lab/ClothoAQA``
  and asks "Answer the question using a single word only." after the question, scored by exact match);
- AudioCaps test: the hub copies hold one caption per row, so the rows of one clip (``youtube_id``) are joined into
  one item with its five references. ``jp1924/AudioCaps`` (its card lists ``audiocap_id``, ``youtube_id``,
  ``start_time``, ``audio`` at 48 kHz, ``caption``; 4,400 test rows) is the copy whose columns we could check;
  we have not downloaded it, and its card states a very large size, so a local copy (a JSON Lines manifest with
  ``references`` lists) may be the better source;
- Clotho v2.1 evaluation (1,045 clips, five captions each): no hub copy whose columns we could verify, so the source
  is local: the split prepared from the official release (``python -m aero_lightning.data.prepare corpus=clotho``,
  whose ``<key>_c1`` .. ``_c5`` samples are joined back into one item) or a JSON Lines manifest;
- AIR-Bench chat (``lmms-lab/AIR_Bench``, config ``Chat``, splits ``sound``, ``music``, ``speech``, ``mixed``:
  ``audio``, ``question``, ``answer_gt``, ``meta_info`` (the audio description the judge reads), ``task_name``;
  lmms-eval ``tasks/air_bench``, post-prompt "Give a detail answer to the question in English."), scored by the
  LLM judge with AIR-Bench's prompt when ``judge.enabled``, and by token F1 / exact match always.

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

__all__ = [
    "BENCHMARKS",
    "CHOICE_INSTRUCTION",
    "OPEN_TASKS",
    "SUITES",
    "TASKS",
    "BenchmarkSpec",
    "get_benchmark",
    "spec_from_options",
]

ESB_ID = "hf-audio/esb-datasets-test-only-sorted"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""Post-prompt of lmms-eval's MMAU and AIR-Bench foundation tasks."""

OPEN_TASKS = ("caption", "aqa", "classify", "instruct")
"""Tasks scored against free-form references (captions, answers, labels)."""
TASKS = ("asr", "choice", *OPEN_TASKS)
CLOTHO_AQA_PROMPT = "\nAnswer the question using a single word only."
"""lmms-eval's Clotho-AQA post-prompt (without its trailing space)."""
AIR_BENCH_CHAT_PROMPT = " Give a detail answer to the question in English."
"""lmms-eval's AIR-Bench chat post-prompt; lmms-eval appends it to the question with no space, we add one."""
CAPTION_PROMPT = "Describe the audio."
"""The first captioning instruction of the training corpora (``aero_lightning.data.corpora``)."""
LONGFORM = (None, "librispeech_chapter")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One evaluation set.

    Attributes:
        name: registry key (``[a-z0-9_]``).
        task: ``asr`` (WER), ``choice`` (multiple-choice accuracy), ``caption`` (caption metrics), ``aqa`` and
            ``instruct`` (exact match, token F1, the LLM judge when enabled) or ``classify`` (label accuracy).
        description: one line for tables.
        hf_id: HF dataset id, or None when the set has no hub copy (local source only).
        hf_config: dataset config name.
        hf_split: split name.
        columns: field -> column. ``asr``: ``audio``, ``text``, optional ``id``. ``choice``: ``audio``,
            ``question``, ``answer``, ``choices`` (a list or JSON-list column) or ``choice_columns``, optional
            ``group`` and ``id``. Long-form LibriSpeech also ``speaker`` and ``chapter``. Open tasks: ``audio``,
            ``answer`` (the reference: a string or a list of them), optional ``question``, ``context`` (the audio
            description the LLM judge reads), ``group``, ``id`` and ``group_by`` (rows with the same value are one
            item whose references are those rows' answers, in row order: one-caption-per-row copies of AudioCaps).
        choice_columns: option columns in letter order (AIR-Bench's ``choice_a``..``choice_d``).
        answer_format: how ``answer`` names the correct option: ``text`` (the option's text), ``letter``, ``index``.
        longform: ``librispeech_chapter`` re-joins utterances per chapter; None for utterance-level sets.
        prompt: default instruction (ASR), the instruction appended after the options (choice), or for open tasks
            the text appended to the question verbatim (lmms-eval's ``post_prompt``), the whole instruction when an
            item has no question.
        reference_columns: open tasks: columns that each hold one reference (Clotho's ``caption_1`` ..
            ``caption_5``), instead of ``answer``.
        labels: ``classify``: the label set replies are matched against; empty: every reference label of the
            dataset.
        judge: the headline score is the LLM judge's (AIR-Bench chat); without ``judge.enabled`` only token F1 and
            exact match are reported.
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
    reference_columns: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    judge: bool = False

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
        if (
            self.task in OPEN_TASKS
            and self.hf_id
            and not ({"answer"} & set(self.columns) or self.reference_columns)
        ):
            problems.append(f"a {self.task} benchmark needs an answer column or reference_columns")
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
    *(
        BenchmarkSpec(
            name=f"clotho_aqa_{part}",
            task="aqa",
            description=f"Clotho-AQA {part} (filtered), one-word answers, exact match",
            hf_id="lmms-lab-audio/ClothoAQA",
            hf_config="clotho_aqa",
            hf_split=f"clotho_aqa_{part}_filtered",
            columns={"audio": "audio", "question": "question", "answer": "answer"},
            prompt=CLOTHO_AQA_PROMPT,
            notes="lmms-eval scores exact match ignoring case and punctuation; SQuAD's normalisation also drops "
            "articles.",
        )
        for part in ("val", "test")
    ),
    BenchmarkSpec(
        name="audiocaps_test",
        task="caption",
        description="AudioCaps test, captioning (five references per clip)",
        hf_id="jp1924/AudioCaps",
        hf_split="test",
        columns={"audio": "audio", "answer": "caption", "id": "youtube_id", "group_by": "youtube_id"},
        prompt=CAPTION_PROMPT,
        notes="Unverified hub copy (one caption per row, grouped by youtube_id); a local JSON Lines manifest with "
        "'references' lists avoids the download.",
    ),
    BenchmarkSpec(
        name="clotho_test",
        task="caption",
        description="Clotho v2.1 evaluation split, captioning (five references per clip)",
        columns={"audio": "audio", "answer": "answer"},
        prompt=CAPTION_PROMPT,
        notes="Local source only: the test split prepared with `prepare corpus=clotho`, or a JSON Lines manifest.",
    ),
    *(
        BenchmarkSpec(
            name=f"air_bench_chat_{part}",
            task="aqa",
            description=f"AIR-Bench chat ({part}), open-ended answers, LLM judge",
            hf_id="lmms-lab/AIR_Bench",
            hf_config="Chat",
            hf_split=part,
            columns={
                "audio": "audio",
                "question": "question",
                "answer": "answer_gt",
                "context": "meta_info",
                "group": "task_name",
            },
            prompt=AIR_BENCH_CHAT_PROMPT,
            judge=True,
            notes="Judged by an LLM (judge.enabled=true, an OpenAI-compatible endpoint); token F1 and exact match "
            "against one reference say little about long answers.",
        )
        for part in ("sound", "music", "speech", "mixed")
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
    "air_bench_chat": tuple(f"air_bench_chat_{p}" for p in ("sound", "music", "speech", "mixed")),
    "audio_understanding": (
        "mmau_test_mini",
        *(f"air_bench_foundation_{p}" for p in ("sound", "music", "speech")),
        "clotho_aqa_test",
        "audiocaps_test",
        "clotho_test",
        *(f"air_bench_chat_{p}" for p in ("sound", "music", "speech", "mixed")),
    ),
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


def spec_from_options(name: str, options: Mapping) -> BenchmarkSpec:
    """The spec of a benchmark entry in the evaluation config.

    A registry name gives its registry entry (``registry: OTHER`` in the options names another one). A name that is
    not in the registry is a local benchmark when its options give a ``task`` and a ``source``, e.g.
    ``benchmark.my_labels={task: classify, source: labels.jsonl, labels: [dog, cat]}``; its optional keys are
    ``prompt``, ``labels`` and ``description``.

    Raises:
        KeyError: for an unknown name without a ``task`` (an
            :class:`~aero_lightning.errors.UnknownNameError`).
        ValueError: for a local benchmark without a source or with an unknown task.
    """
    registry = options.get("registry")
    if registry or name in BENCHMARKS or not options.get("task"):
        return get_benchmark(registry or name)
    task = str(options["task"])
    if not options.get("source"):
        raise ValueError(f"local benchmark {name} (task {task}) needs benchmark.{name}.source=PATH")
    default_prompt = {"asr": DEFAULT_ASR_PROMPT, "choice": CHOICE_INSTRUCTION, "caption": CAPTION_PROMPT}
    return BenchmarkSpec(
        name=name,
        task=task,
        description=str(options.get("description") or f"local {task} set"),
        columns={"audio": "audio", "question": "question", "choices": "choices", "answer": "answer"}
        if task == "choice"
        else {"audio": "audio", "answer": "answer"},
        prompt=default_prompt.get(task, ""),
        labels=tuple(str(label) for label in options.get("labels") or ()),
    )
