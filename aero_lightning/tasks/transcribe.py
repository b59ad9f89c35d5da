"""The transcription task: audio files in, text out (``python transcribe.py ckpt=PATH audio=FILE_DIR_OR_GLOB``).

Files are read with libsndfile (any format it decodes, any rate and channel count; downmixed and resampled to
16 kHz), grouped into batches of similar length and decoded with :func:`aero_lightning.eval.decode.decode_waveforms`:
greedy, a token budget that scales with the duration, a repetition guard that stops a reply in a loop, and
recordings longer than one pass can hold (the LLM's context, at most ``generation.max_pass_s``) cut into
overlapping chunks whose texts are merged.

Every input is accounted for: each file found, and each named path or pattern that matches nothing, gets a record
in the output, either a transcript or the reason it failed (``missing_file`` for a path or pattern that names no
file, else :data:`~aero_lightning.data.audio_io.READ_FAILURE_REASONS`). The exit status of
``transcribe.py`` says whether all of them were transcribed (:data:`EXIT_CODES`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from aero_lightning.data.audio_io import AudioReadError, audio_duration_s, find_audio_files, load_audio
from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.eval.decode import (
    GenerationOptions,
    Stopwatch,
    chars_per_token,
    decode_waveforms,
    plan_decode_batches,
)
from aero_lightning.model.build import load_model
from aero_lightning.progress import Progress

logger = logging.getLogger(__name__)

__all__ = [
    "EXIT_CODES",
    "expand_inputs",
    "exit_code",
    "text_lines",
    "transcribe",
    "transcribe_files",
    "write_transcripts",
]

EXIT_CODES: dict[int, str] = {
    0: "every input was transcribed",
    1: "no input was transcribed (each failed; the output lists why)",
    2: "a usage error: bad arguments, a missing checkpoint, or no input found at all",
    3: "some inputs were transcribed and some failed (the output lists which, and why)",
}
"""Exit status of ``transcribe.py`` -> meaning (also in its ``--help`` and the README)."""

LONG_FILE_PROGRESS_S = 60.0
"""A file at least this long, decoded alone, also shows its progress in generated tokens."""


def _failure(path: str | os.PathLike, err: AudioReadError) -> dict:
    """The record of a file that could not be read: ``{"path", "reason", "error"}``."""
    return {"path": str(path), "reason": err.reason, "error": str(err)}


def expand_inputs(audio: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """The files an ``audio=`` value names, and the items that name none.

    Args:
        audio: a file, a folder (searched recursively), a glob, or a list of them
            (:func:`~aero_lightning.data.audio_io.find_audio_files`).

    Returns:
        ``(files, unmatched)``: the files in sorted order without duplicates, and the items (as given) that are no
        file, no folder with audio and match no file, so that they can be reported instead of dropped.

    Raises:
        FileNotFoundError: if no item names any file.
    """
    items = [audio] if isinstance(audio, (str, os.PathLike)) else list(audio)
    matched, unmatched = [], []
    for item in items:
        try:
            find_audio_files(item)
            matched.append(item)
        except FileNotFoundError:
            unmatched.append(str(item))
    if not matched:
        find_audio_files(items)  # raises, with the message that says what was looked for
    return find_audio_files(matched), unmatched


def transcribe_files(
    model,
    files: Sequence[str | os.PathLike],
    prompt: str = DEFAULT_ASR_PROMPT,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    max_batch_audio_s: float | None = 1800.0,
    progress: bool = True,
    unmatched: Sequence[str] = (),
) -> dict:
    """Transcribe audio files with a loaded model.

    Args:
        model: an :class:`~aero_lightning.model.aero.AeroModel` in eval mode.
        files: audio file paths (a path that does not exist is reported as ``missing_file``).
        prompt: the instruction after the audio.
        options: generation settings (greedy, duration-scaled budget, repetition guard, chunking by default).
        batch_size: most files per generation batch.
        max_batch_audio_s: padded audio per batch in seconds (``batch size x longest file``); a longer file is
            decoded alone.
        progress: show progress (stderr): files done, and the tokens of a long file decoded alone
            (:class:`~aero_lightning.progress.Progress`: a bar on a terminal, a log line every 30 s otherwise).
        unmatched: items of the user's input that named no file (:func:`expand_inputs`); each gets a
            ``missing_file`` record after those of ``files``.

    Returns:
        ``{"records": [...], "inputs", "files", "transcribed", "failed", "failed_by_reason",
        "stopped_by_repetition_guard", "budget_hit", "chunked", "audio_s", "inference_s", "rtfx"}``; ``inputs`` =
        files + unmatched items = transcribed + failed. Each record is ``{"path", "text", "duration_s",
        "num_new_tokens", "finished", "stopped_by_repetition_guard", "num_chunks"}`` or ``{"path", "reason",
        "error"}``, in the order of ``files`` then ``unmatched``. ``rtfx`` = audio seconds / inference wall
        seconds (reading files excluded).
    """
    options = options or GenerationOptions()
    paths = [Path(f) for f in files]
    records: list[dict | None] = [None] * len(paths)
    durations: dict[int, float] = {}
    for i, p in enumerate(paths):
        try:
            durations[i] = audio_duration_s(p)
        except AudioReadError as err:
            records[i] = _failure(p, err)
            logger.error("skipping %s (%s)", err, records[i]["reason"])
    readable = sorted(durations)
    batches = plan_decode_batches([durations[i] for i in readable], batch_size, max_batch_audio_s)
    cpt = chars_per_token(model.tokenizer)
    watch = Stopwatch(next(model.parameters()).device)
    audio_s = 0.0
    bar = Progress(len(paths) + len(unmatched), "transcribing", unit="file", enabled=progress)
    bar.update(len(paths) - len(readable) + len(unmatched))
    for batch in batches:
        idx = [readable[j] for j in batch]
        waves, kept = [], []
        for i in idx:
            try:
                waves.append(load_audio(paths[i]))
                kept.append(i)
            except AudioReadError as err:
                records[i] = _failure(paths[i], err)
                logger.error("skipping %s (%s)", err, records[i]["reason"])
        if waves:
            long_alone = len(waves) == 1 and len(waves[0]) >= LONG_FILE_PROGRESS_S * SAMPLE_RATE_HZ
            with watch:
                results = decode_waveforms(
                    model,
                    waves,
                    prompt,
                    options,
                    tokenizer_chars_per_token=cpt,
                    progress_desc=paths[kept[0]].name if progress and long_alone else None,
                )
            for i, wave, res in zip(kept, waves, results):
                duration_s = len(wave) / SAMPLE_RATE_HZ
                audio_s += duration_s
                records[i] = {
                    "path": str(paths[i]),
                    "text": res.text,
                    "duration_s": round(duration_s, 3),
                    "num_new_tokens": res.num_new_tokens,
                    "finished": res.finished,
                    "stopped_by_repetition_guard": res.stopped_by_repetition_guard,
                    "num_chunks": res.num_chunks,
                }
                if res.stopped_by_repetition_guard:
                    logger.warning("%s: the repetition guard stopped a loop in the reply", paths[i])
        bar.update(len(idx), postfix=f"RTFx {audio_s / max(watch.seconds, 1e-9):.1f}")
    bar.close()
    for item in unmatched:
        records.append(
            {
                "path": item,
                "reason": "missing_file",
                "error": f"{item}: no such file, folder or matching pattern",
            }
        )
        logger.error("skipping %s: no such file, folder or matching pattern (missing_file)", item)
    done = [r for r in records if r is not None and "text" in r]
    failed = [r for r in records if r is not None and "error" in r]
    summary = {
        "records": records,
        "inputs": len(records),
        "files": len(paths),
        "transcribed": len(done),
        "failed": len(failed),
        "failed_by_reason": dict(sorted(Counter(r["reason"] for r in failed).items())),
        "stopped_by_repetition_guard": sum(r["stopped_by_repetition_guard"] for r in done),
        "budget_hit": sum(not r["finished"] and not r["stopped_by_repetition_guard"] for r in done),
        "chunked": sum(r["num_chunks"] > 1 for r in done),
        "audio_s": round(audio_s, 3),
        "inference_s": round(watch.seconds, 3),
        "rtfx": round(audio_s / watch.seconds, 2) if watch.seconds > 0 else None,
    }
    if summary["budget_hit"]:
        logger.warning(
            "%d of %d transcript(s) reached their token budget without an end-of-turn token and were cut there "
            "(an untrained model; raise generation.max_new_tokens / chars_per_second if speech is fast)",
            summary["budget_hit"],
            len(done),
        )
    if summary["stopped_by_repetition_guard"]:
        logger.warning(
            "%d of %d transcript(s) were stopped by the repetition guard (generation.repetition_guard): they end "
            "in a loop and may miss the rest of their audio",
            summary["stopped_by_repetition_guard"],
            len(done),
        )
    if failed:
        logger.error(
            "%d of %d input(s) could not be transcribed: %s",
            len(failed),
            len(records),
            "; ".join(f"{r['path']} ({r['reason']})" for r in failed),
        )
    return summary


def exit_code(summary: dict) -> int:
    """The exit status for a :func:`transcribe_files` summary (:data:`EXIT_CODES`): 0 all, 1 none, 3 some."""
    if summary["failed"] == 0:
        return 0
    return 1 if summary["transcribed"] == 0 else 3


def text_lines(records: Iterable[dict]) -> list[str]:
    """Records as text lines: ``path<TAB>text`` per transcript, ``#failed<TAB>path<TAB>reason<TAB>error`` per
    failed input (a ``#`` line, so readers of ``path<TAB>text`` can skip it)."""
    lines = []
    for r in records:
        if "text" in r:
            lines.append(f"{r['path']}\t{r['text']}")
        else:
            lines.append(f"#failed\t{r['path']}\t{r['reason']}\t{r['error']}")
    return lines


def write_transcripts(records: Sequence[dict], output: str | os.PathLike) -> Path:
    """Write records as JSON Lines (``.jsonl``/``.json``) or as :func:`text_lines` (any other suffix).

    Failed inputs are written too: with their ``reason`` and ``error`` in JSON Lines, as ``#failed`` lines in text.
    """
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        if out.suffix.lower() in (".jsonl", ".json"):
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            for line in text_lines(records):
                f.write(line + "\n")
    return out


def transcribe(cfg: DictConfig) -> dict:
    """Run the transcription task from the composed ``conf/transcribe.yaml``.

    Returns:
        :func:`transcribe_files`'s summary plus ``output`` (the written file) and ``exit_code``
        (:func:`exit_code`).

    Raises:
        FileNotFoundError: if ``audio`` names no file at all, or the checkpoint is missing.
    """
    audio = cfg.audio
    audio = OmegaConf.to_container(audio) if OmegaConf.is_list(audio) else str(audio)
    files, unmatched = expand_inputs(audio)
    logger.info(
        "%d audio file(s) to transcribe%s",
        len(files),
        f"; {len(unmatched)} input(s) match no file: {unmatched}" if unmatched else "",
    )
    model = load_model(cfg.ckpt, device=cfg.get("device"), dtype=cfg.get("dtype"), config=cfg.get("config"))
    options = GenerationOptions(**OmegaConf.to_container(cfg.generation, resolve=True))
    result = transcribe_files(
        model,
        files,
        prompt=cfg.prompt,
        options=options,
        batch_size=int(cfg.batch_size),
        max_batch_audio_s=cfg.get("max_batch_audio_s"),
        progress=bool(cfg.get("progress", True)),
        unmatched=unmatched,
    )
    output = cfg.get("output") or Path(cfg.paths.output_dir) / "transcripts.jsonl"
    result["output"] = str(write_transcripts(result["records"], output))
    result["exit_code"] = exit_code(result)
    failed = ", ".join(f"{k} {v}" for k, v in result["failed_by_reason"].items())
    logger.info(
        "transcribed %d of %d input(s)%s, %.1f s of audio in %.1f s (RTFx %s); %d stopped by the repetition "
        "guard, %d chunked; written to %s; exit status %d: %s",
        result["transcribed"],
        result["inputs"],
        f" (failed: {failed})" if failed else "",
        result["audio_s"],
        result["inference_s"],
        result["rtfx"],
        result["stopped_by_repetition_guard"],
        result["chunked"],
        result["output"],
        result["exit_code"],
        EXIT_CODES[result["exit_code"]],
    )
    return result
