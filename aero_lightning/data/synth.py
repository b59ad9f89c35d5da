"""Offline demo ASR corpus: espeak-ng speech of real English sentences.

Text: the example sentences of Princeton WordNet 3.0 (the double-quoted examples in the synset glosses of
``/usr/share/wordnet/data.{noun,verb,adj,adv}``, Debian/Ubuntu package ``wordnet-base``; WordNet 3.0
Copyright 2006 by Princeton University, WordNet licence). About 41k sentences survive cleaning.

Speech: espeak-ng, rotating every working English voice (those whose voice file lives under ``gmw/``; the
``mb/`` mbrola voices need the separate mbrola synthesiser), with a per-sentence variant (``+m1``..``+m7``,
``+f1``..``+f5``), speed (words per minute) and pitch (espeak's 0..99 scale) drawn from an RNG seeded by
``(seed, sentence position)``, so the audio never depends on worker scheduling. Audio is resampled
22050 -> 16000 Hz and stored as FLAC in WebDataset shards (see :mod:`aero_lightning.data.shards`).

Splits are by sentence: the cleaned, sorted list is shuffled with ``seed`` and cut into test, validation and
train in that order, so the test and validation sets stay the same when ``num_train`` changes.

Layout::

    OUT/train/demo_espeak-train-000000.tar ... manifest.json
    OUT/validation/...
    OUT/test/...

CLI::

    python -m aero_lightning.data.synth --out data_cache/demo_corpus [--train 12000 --val 200 --test 200]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.data.rejects import check_reason
from aero_lightning.data.shards import (
    MANIFEST_NAME,
    SAMPLE_RATE_HZ,
    ShardWriter,
    asr_sample_json,
    build_manifest,
    encode_flac,
    write_manifest,
)
from aero_lightning.progress import Progress

log = logging.getLogger(__name__)

CORPUS_NAME = "demo_espeak"
FORMAT_VERSION = 1
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_POS = ("noun", "verb", "adj", "adv")
SPLITS = ("test", "validation", "train")
"""Split names in the order they are cut from the shuffled sentence list."""

VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
"""espeak-ng voice variants (``!v/<name>``); ``m8`` (tone filter) and the novelty voices are left out."""
SPEED_RANGE_WPM: tuple[int, int] = (140, 200)
"""Inclusive range of the speaking rate in words per minute (espeak-ng default: 175)."""
PITCH_RANGE: tuple[int, int] = (35, 65)
"""Inclusive range of the base pitch on espeak-ng's 0..99 scale (default: 50)."""
MIN_WORDS, MAX_WORDS = 3, 20
PEAK_LIMIT = 0.99

_ALLOWED = re.compile(r"[A-Za-z ,.'?!;:\-]+")
_QUOTED = re.compile(r'"([^"]*)"')

_ESPEAK_INSTALL = (
    "espeak-ng was not found on PATH. Install it: `sudo apt-get install espeak-ng` (Debian/Ubuntu) or "
    "`brew install espeak-ng` (macOS)."
)


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is not installed (or not on ``PATH``)."""


class WordNetNotFoundError(FileNotFoundError):
    """The WordNet database files are missing."""


# ---------------------------------------------------------------------------------------- sentences


def clean_sentences(raw: Iterable[str], min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[str]:
    """Clean candidate sentences into a sorted, de-duplicated list.

    A sentence is kept when, after stripping whitespace and double quotes, collapsing inner whitespace and
    dropping leading ellipsis dots, it consists only of ASCII letters, spaces and ``, . ' ? ! ; : -``,
    starts with a letter or an apostrophe, and has ``min_words..max_words`` words. Duplicates are removed
    case-insensitively (the first spelling in sorted order wins).

    Args:
        raw: candidate sentences.
        min_words: minimum number of whitespace-separated words (inclusive).
        max_words: maximum number of words (inclusive).

    Returns:
        Cleaned sentences, sorted.
    """
    kept: list[str] = []
    for sentence in raw:
        sentence = " ".join(sentence.strip().strip('"').split()).lstrip(". ")
        if not sentence or not _ALLOWED.fullmatch(sentence):
            continue
        if not (sentence[0].isalpha() or sentence[0] == "'"):
            continue
        if min_words <= len(sentence.split()) <= max_words:
            kept.append(sentence)
    unique: dict[str, str] = {}
    for sentence in sorted(kept):
        unique.setdefault(sentence.casefold(), sentence)
    return sorted(unique.values())


def wordnet_examples(wordnet_dir: str | os.PathLike = WORDNET_DIR) -> list[str]:
    """Raw example sentences of WordNet, in file order.

    Reads the glosses (text after ``" | "``) of ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv``
    and returns every double-quoted segment. Source: Princeton WordNet 3.0 as shipped by the Debian/Ubuntu
    package ``wordnet-base``.

    Args:
        wordnet_dir: folder holding the ``data.*`` files.

    Returns:
        Uncleaned example strings (without the quotes).

    Raises:
        WordNetNotFoundError: if a data file is missing.
    """
    wordnet_dir = Path(wordnet_dir)
    paths = [wordnet_dir / f"data.{pos}" for pos in WORDNET_POS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise WordNetNotFoundError(
            f"WordNet data files not found: {', '.join(missing)}. Install them with "
            "`sudo apt-get install wordnet-base` (Debian/Ubuntu), or pass your own sentences."
        )
    examples: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  ") or " | " not in line:  # licence header lines start with 2 spaces
                    continue
                examples.extend(_QUOTED.findall(line.split(" | ", 1)[1]))
    return examples


def load_wordnet_sentences(
    wordnet_dir: str | os.PathLike = WORDNET_DIR, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS
) -> list[str]:
    """Cleaned WordNet example sentences (see :func:`wordnet_examples` and :func:`clean_sentences`).

    Args:
        wordnet_dir: folder holding WordNet's ``data.*`` files.
        min_words: minimum words per sentence (inclusive).
        max_words: maximum words per sentence (inclusive).

    Returns:
        Sorted, de-duplicated sentences (about 41k with WordNet 3.0 and the defaults).

    Raises:
        WordNetNotFoundError: if WordNet is not installed.
    """
    return clean_sentences(wordnet_examples(wordnet_dir), min_words, max_words)


def resolve_sentences(sentences: Sequence[str] | str | os.PathLike | None) -> tuple[list[str], str]:
    """Cleaned sentence pool and a short description of where it came from.

    Args:
        sentences: ``None`` for WordNet, a path (``str`` or path-like) to a UTF-8 file with one sentence per
            line, or a sequence of sentences. All are cleaned with :func:`clean_sentences`.

    Returns:
        ``(sentences, origin)``, origin being ``"wordnet-3.0"``, ``"file:<name>"`` or ``"list"``.

    Raises:
        WordNetNotFoundError: if ``sentences`` is ``None`` and WordNet is missing.
        FileNotFoundError: if a sentence file does not exist.
    """
    if sentences is None:
        return load_wordnet_sentences(), "wordnet-3.0"
    if isinstance(sentences, (str, os.PathLike)):
        path = Path(sentences)
        return clean_sentences(path.read_text(encoding="utf-8").splitlines()), f"file:{path.name}"
    return clean_sentences(sentences), "list"


# ------------------------------------------------------------------------------------------- espeak


def find_espeak() -> str:
    """Path of the ``espeak-ng`` executable.

    Raises:
        EspeakNotFoundError: if it is not on ``PATH`` (message says how to install it).
    """
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakNotFoundError(_ESPEAK_INSTALL)
    return path


def espeak_version(espeak: str | None = None) -> str:
    """espeak-ng version string, e.g. ``"1.51"``."""
    out = subprocess.run(
        [espeak or find_espeak(), "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", out)
    return match.group(1) if match else out.strip()


@dataclass(frozen=True)
class VoiceSpec:
    """One espeak-ng rendering setting.

    Attributes:
        voice_file: espeak voice identifier, e.g. ``"gmw/en-US"``.
        variant: variant name, e.g. ``"f2"``.
        speed_wpm: speaking rate in words per minute.
        pitch: base pitch, 0..99.
    """

    voice_file: str
    variant: str
    speed_wpm: int
    pitch: int

    @property
    def voice(self) -> str:
        """Short voice name, e.g. ``"en-US"``."""
        return self.voice_file.rsplit("/", 1)[-1]

    @property
    def espeak_voice(self) -> str:
        """The ``-v`` argument, e.g. ``"gmw/en-US+f2"``."""
        return f"{self.voice_file}+{self.variant}"

    @property
    def source(self) -> str:
        """Provenance string, e.g. ``"espeak-ng:en-US+f2:s170:p50"``."""
        return f"espeak-ng:{self.voice}+{self.variant}:s{self.speed_wpm}:p{self.pitch}"


def synthesize(
    text: str,
    spec: VoiceSpec,
    espeak: str = "espeak-ng",
    sample_rate: int = SAMPLE_RATE_HZ,
    timeout_s: float = 60,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng.

    Runs ``espeak-ng -v VOICE+VARIANT -s SPEED -p PITCH --stdout --stdin`` without a shell (text on stdin, so
    a sentence can never be parsed as an option), decodes the WAV (22050 Hz), downmixes to mono, resamples
    with soxr and scales the waveform down if its peak exceeds 0.99.

    Args:
        text: text to speak.
        spec: voice, variant, speed (wpm) and pitch.
        espeak: espeak-ng executable.
        sample_rate: output sample rate in Hz.
        timeout_s: subprocess timeout in seconds.

    Returns:
        ``(T,)`` float32 waveform at ``sample_rate`` with peak <= 0.99 (may be empty).

    Raises:
        RuntimeError: if espeak-ng fails or writes no audio.
        subprocess.TimeoutExpired: if it runs longer than ``timeout_s``.
    """
    cmd = [
        espeak,
        "-v",
        spec.espeak_voice,
        "-s",
        str(spec.speed_wpm),
        "-p",
        str(spec.pitch),
        "--stdout",
        "--stdin",
    ]
    proc = subprocess.run(
        cmd, input=text.encode("utf-8"), capture_output=True, timeout=timeout_s, check=False
    )
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng exited with status {proc.returncode}: {stderr}")
    if not proc.stdout:
        raise RuntimeError(f"espeak-ng wrote no audio: {stderr or 'no message'}")
    wave, source_rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)  # (T, C)
    wave = wave.mean(axis=1, dtype=np.float32)  # (T,)
    if wave.size and source_rate != sample_rate:
        wave = soxr.resample(wave, source_rate, sample_rate).astype(np.float32, copy=False)  # (T',)
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak > PEAK_LIMIT:
        wave = wave * np.float32(PEAK_LIMIT / peak)
    return np.ascontiguousarray(wave, dtype=np.float32)


def list_english_voices(espeak: str | None = None, probe: bool = True) -> list[str]:
    """Working English espeak-ng voices.

    Parses ``espeak-ng --voices=en`` and keeps voices whose File column starts with ``gmw/`` (the ``mb/``
    mbrola voices need mbrola). With ``probe``, each voice must also speak a short word.

    Args:
        espeak: espeak-ng executable (found on ``PATH`` when ``None``).
        probe: synthesise a test word with every voice and drop those that fail.

    Returns:
        Sorted voice identifiers, e.g. ``["gmw/en", "gmw/en-029", "gmw/en-GB-scotland", ...]``.

    Raises:
        EspeakNotFoundError: if espeak-ng is missing.
        RuntimeError: if no English voice works.
    """
    espeak = espeak or find_espeak()
    out = subprocess.run(
        [espeak, "--voices=en"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    voices = set()
    for line in out.splitlines()[1:]:
        fields = line.split()  # Pty Language Age/Gender VoiceName File [Other Languages]
        if len(fields) >= 5 and fields[4].startswith("gmw/"):
            voices.add(fields[4])
    working = []
    for voice in sorted(voices):
        if probe:
            try:
                if synthesize("test", VoiceSpec(voice, VARIANTS[0], 175, 50), espeak).size == 0:
                    raise RuntimeError("empty audio")
            except Exception as err:  # noqa: BLE001 - a broken voice is skipped, not fatal
                log.warning("espeak-ng voice %s does not work (%s); skipping it", voice, err)
                continue
        working.append(voice)
    if not working:
        raise RuntimeError(f"espeak-ng ({espeak}) lists no working English gmw/ voice:\n{out}")
    return working


def voice_for_position(position: int, seed: int, voices: Sequence[str]) -> VoiceSpec:
    """Rendering settings of the sentence at ``position`` of the shuffled list.

    The voice rotates with the position; variant, speed and pitch come from ``random.Random`` seeded with
    ``(seed, position)``, so they do not depend on the split sizes or on worker scheduling.

    Args:
        position: index of the sentence in the seed-shuffled sentence list.
        seed: corpus seed.
        voices: voice identifiers from :func:`list_english_voices`.

    Returns:
        The :class:`VoiceSpec`.
    """
    rng = random.Random(f"aero-demo-espeak:{seed}:{position}")
    return VoiceSpec(
        voice_file=voices[position % len(voices)],
        variant=rng.choice(VARIANTS),
        speed_wpm=rng.randint(*SPEED_RANGE_WPM),
        pitch=rng.randint(*PITCH_RANGE),
    )


# --------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class _Job:
    key: str
    text: str
    spec: VoiceSpec


@dataclass
class _Rendered:
    job: _Job
    flac: bytes | None = None
    num_samples: int = 0
    reason: str | None = None
    detail: str = ""


def _render(job: _Job, espeak: str) -> _Rendered:
    """Synthesise and encode one sentence; every failure becomes a rejection, never an exception."""
    try:
        wave = synthesize(job.text, job.spec, espeak)  # module-level lookup: tests monkeypatch it
    except Exception as err:  # noqa: BLE001
        return _Rendered(job, reason="synthesis_failed", detail=f"{type(err).__name__}: {err}")
    if wave.size == 0 or not np.any(wave):
        return _Rendered(job, reason="empty_audio", detail=f"espeak-ng produced {wave.size} silent samples")
    if not np.all(np.isfinite(wave)):
        return _Rendered(job, reason="non_finite_audio", detail="waveform contains NaN or inf")
    try:
        flac = encode_flac(wave, SAMPLE_RATE_HZ)
    except Exception as err:  # noqa: BLE001
        return _Rendered(job, reason="encode_failed", detail=f"{type(err).__name__}: {err}")
    return _Rendered(job, flac=flac, num_samples=int(wave.size))


def _ordered_map(
    fn: Callable[[_Job], _Rendered], jobs: Sequence[_Job], num_workers: int
) -> Iterator[_Rendered]:
    """``map`` over a thread pool in input order, with at most ``4 * num_workers`` jobs in flight."""
    window = 4 * num_workers
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="espeak") as pool:
        pending: deque[Future[_Rendered]] = deque()
        it = iter(jobs)
        for job in it:
            pending.append(pool.submit(fn, job))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            job = next(it, None)
            if job is not None:
                pending.append(pool.submit(fn, job))
            yield result


def _sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _clear_split(folder: Path, prefix: str) -> None:
    """Remove the manifest first (a half-written folder is never 'complete'), then our shards."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for path in sorted(folder.glob(f"{prefix}-*.tar")) + sorted(folder.glob(f"{prefix}-*.tar.tmp")):
        path.unlink()


def _build_split(
    folder: Path,
    split: str,
    jobs: Sequence[_Job],
    params: dict[str, Any],
    shard_size: int,
    num_workers: int,
    espeak: str,
    progress: bool,
) -> dict[str, Any]:
    prefix = f"{CORPUS_NAME}-{split}"
    folder.mkdir(parents=True, exist_ok=True)
    _clear_split(folder, prefix)
    rejected: list[dict[str, str]] = []
    bar = Progress(len(jobs), f"{CORPUS_NAME}/{split}", unit="utt", enabled=progress)
    with bar, ShardWriter(folder, prefix, shard_size) as writer:
        for item in _ordered_map(lambda job: _render(job, espeak), jobs, num_workers):
            bar.update(1)
            job = item.job
            if item.flac is None:
                log.warning("%s: skipped %r (%s: %s)", job.key, job.text, item.reason, item.detail)
                rejected.append(
                    {"key": job.key, "reason": check_reason(str(item.reason)), "detail": item.detail}
                )
                continue
            record = asr_sample_json(
                corpus=CORPUS_NAME,
                text=job.text,
                duration_s=round(item.num_samples / SAMPLE_RATE_HZ, 6),
                source=job.spec.source,
                language="en",
                prompt=DEFAULT_ASR_PROMPT,
                voice=job.spec.voice,
                variant=job.spec.variant,
                speed_wpm=job.spec.speed_wpm,
                pitch=job.spec.pitch,
            )
            writer.write(job.key, item.flac, record)
    manifest = build_manifest(
        corpus=CORPUS_NAME,
        split=split,
        shards=writer.shards,
        durations_s=writer.durations_s,
        rejected=rejected,
        build_params=params,
    )
    write_manifest(folder, manifest)
    return manifest


def build_demo_corpus(
    out_dir: str | os.PathLike,
    num_train: int = 12000,
    num_val: int = 200,
    num_test: int = 200,
    seed: int = 0,
    shard_size: int = 1000,
    num_workers: int | None = None,
    sentences: Sequence[str] | str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Build the espeak-ng demo ASR corpus into ``out_dir/{train,validation,test}``.

    Each split folder gets WebDataset shards ``demo_espeak-<split>-%06d.tar`` and a ``manifest.json``
    (schema: :mod:`aero_lightning.data.shards`) whose ``build_params`` record everything that determines the
    split's bytes. A split whose manifest already has identical ``build_params`` is skipped unless
    ``overwrite``; otherwise the split's old shards are deleted and it is rebuilt. Output is byte-identical
    for identical inputs, whatever ``num_workers``.

    Sample keys are ``demo-<split>-%06d`` (index within the split); a sentence that fails to synthesise is
    left out and listed under ``rejected`` with its key and reason.

    Args:
        out_dir: output root folder.
        num_train: training sentences.
        num_val: validation sentences.
        num_test: test sentences.
        seed: shuffling and voice-setting seed.
        shard_size: samples per tar shard.
        num_workers: synthesis threads (each drives one espeak-ng process); ``os.cpu_count()`` when ``None``.
        sentences: ``None`` for WordNet 3.0 example sentences, else a sentence list or a path to a file with
            one sentence per line (cleaned with :func:`clean_sentences` either way).
        overwrite: rebuild splits even when their manifest matches.
        progress: a progress bar on a terminal, else a progress log line every 30 s.

    Returns:
        ``{"train": manifest, "validation": manifest, "test": manifest}``.

    Raises:
        EspeakNotFoundError: if espeak-ng is not installed.
        WordNetNotFoundError: if ``sentences`` is ``None`` and WordNet is not installed.
        ValueError: if a count is negative or there are fewer cleaned sentences than requested.
    """
    counts = {"test": int(num_test), "validation": int(num_val), "train": int(num_train)}
    if any(n < 0 for n in counts.values()) or shard_size < 1:
        raise ValueError(
            f"split sizes must be >= 0 and shard_size >= 1, got {counts}, shard_size={shard_size}"
        )
    num_workers = max(1, int(num_workers or os.cpu_count() or 1))
    out_dir = Path(out_dir)
    start_time = time.perf_counter()

    espeak = find_espeak()
    pool, origin = resolve_sentences(sentences)
    needed = sum(counts.values())
    if needed > len(pool):
        raise ValueError(
            f"requested {needed} sentences ({counts}) but only {len(pool)} cleaned sentences exist"
        )
    voices = list_english_voices(espeak)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    log.info(
        "demo corpus: %d cleaned sentences (%s), %d voices %s, %d workers",
        len(pool), origin, len(voices), [v.rsplit("/", 1)[-1] for v in voices], num_workers,
    )  # fmt: skip

    common = {
        "format_version": FORMAT_VERSION,
        "corpus": CORPUS_NAME,
        "seed": int(seed),
        "sentence_origin": origin,
        "num_sentences": len(pool),
        "sentences_sha256": _sha256_lines(pool),
        "shard_size": int(shard_size),
        "voices": voices,
        "variants": list(VARIANTS),
        "speed_range_wpm": list(SPEED_RANGE_WPM),
        "pitch_range": list(PITCH_RANGE),
        "espeak_version": espeak_version(espeak),
        "sample_rate": SAMPLE_RATE_HZ,
        "prompt": DEFAULT_ASR_PROMPT,
    }
    manifests: dict[str, dict[str, Any]] = {}
    start = 0
    for split in SPLITS:
        count = counts[split]
        params = json.loads(json.dumps({**common, "split_start": start, "split_count": count}))
        positions = order[start : start + count]
        start += count
        folder = out_dir / split
        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_file() and not overwrite:
            existing = json.loads(manifest_path.read_text(encoding="utf-8"))
            if existing.get("build_params") == params:
                log.info("%s: %s is up to date (same build_params); skipping", split, manifest_path)
                manifests[split] = existing
                continue
            old = existing.get("build_params") or {}
            changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            log.warning("%s: build parameters changed (%s); rebuilding", split, ", ".join(changed))
        jobs = [
            _Job(f"demo-{split}-{i:06d}", pool[p], voice_for_position(p, seed, voices))
            for i, p in enumerate(positions)
        ]
        split_start = time.perf_counter()
        manifests[split] = _build_split(
            folder, split, jobs, params, shard_size, num_workers, espeak, progress
        )
        m = manifests[split]
        log.info(
            "%s: %d samples, %.3f h in %d shards, rejected %s (%.1f s)",
            split, m["num_samples"], m["hours"], len(m["shards"]), m["rejected_counts"] or "none",
            time.perf_counter() - split_start,
        )  # fmt: skip
    log.info(
        "demo corpus ready in %s: %s (%.1f s)",
        out_dir,
        ", ".join(
            f"{s} {manifests[s]['num_samples']} samples / {manifests[s]['hours']:.2f} h" for s in SPLITS
        ),
        time.perf_counter() - start_time,
    )
    return {split: manifests[split] for split in ("train", "validation", "test")}


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Command-line entry point (``python -m aero_lightning.data.synth --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m aero_lightning.data.synth",
        description="Build the offline espeak-ng demo ASR corpus (WordNet 3.0 example sentences).",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (gets train/ validation/ test/)"
    )
    parser.add_argument("--train", type=int, default=12000, help="training sentences (default: 12000)")
    parser.add_argument("--val", type=int, default=200, help="validation sentences (default: 200)")
    parser.add_argument("--test", type=int, default=200, help="test sentences (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="split / voice seed (default: 0)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default: 1000)")
    parser.add_argument("--workers", type=int, default=None, help="synthesis threads (default: CPU count)")
    parser.add_argument("--sentences", type=Path, default=None, help="text file, one sentence per line")
    parser.add_argument("--overwrite", action="store_true", help="rebuild splits even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return build_demo_corpus(
        args.out,
        num_train=args.train,
        num_val=args.val,
        num_test=args.test,
        seed=args.seed,
        shard_size=args.shard_size,
        num_workers=args.workers,
        sentences=args.sentences,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
