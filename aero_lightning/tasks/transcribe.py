"""The transcription task: audio files in, text out (``python transcribe.py ckpt=PATH audio=FILE_DIR_OR_GLOB``).

Files are read with libsndfile (any format it decodes, any rate and channel count; downmixed and resampled to
16 kHz), grouped into batches of similar length and decoded with :func:`aero_lightning.eval.decode.decode_waveforms`.
Long recordings are not chunked: a 15-minute file is 30 encoder windows whose tokens the LLM reads in one context.
A file that cannot be read is reported with its reason and counted; the others are transcribed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import soundfile as sf
from omegaconf import DictConfig, OmegaConf

from aero_lightning.data.audio_io import AudioReadError, find_audio_files, load_audio
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

__all__ = ["transcribe", "transcribe_files", "write_transcripts"]


def _probe_duration_s(path: Path) -> float:
    """Duration from the file header (no decoding); raises :class:`AudioReadError` if libsndfile cannot open it."""
    try:
        info = sf.info(str(path))
    except Exception as err:  # noqa: BLE001 - libsndfile raises several types
        raise AudioReadError(f"{path}: not readable as audio ({type(err).__name__}: {err})") from err
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioReadError(f"{path}: the file holds no audio samples")
    return info.frames / info.samplerate


def transcribe_files(
    model,
    files: Sequence[str | os.PathLike],
    prompt: str = DEFAULT_ASR_PROMPT,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    max_batch_audio_s: float | None = 1800.0,
    progress: bool = True,
) -> dict:
    """Transcribe audio files with a loaded model.

    Args:
        model: an :class:`~aero_lightning.model.aero.AeroModel` in eval mode.
        files: audio file paths.
        prompt: the instruction after the audio.
        options: generation settings (greedy, duration-scaled budget by default).
        batch_size: most files per generation batch.
        max_batch_audio_s: padded audio per batch in seconds (``batch size x longest file``); a longer file is
            decoded alone.
        progress: show a progress bar (stderr).

    Returns:
        ``{"records": [...], "files", "transcribed", "failed", "audio_s", "inference_s", "rtfx"}``; each record is
        ``{"path", "text", "duration_s", "num_new_tokens", "finished"}`` or ``{"path", "error"}``, in the order of
        ``files``. ``rtfx`` = audio seconds / inference wall seconds (reading files excluded).
    """
    options = options or GenerationOptions()
    paths = [Path(f) for f in files]
    records: list[dict | None] = [None] * len(paths)
    durations: dict[int, float] = {}
    for i, p in enumerate(paths):
        try:
            durations[i] = _probe_duration_s(p)
        except AudioReadError as err:
            records[i] = {"path": str(p), "error": str(err)}
            logger.error("skipping %s", err)
    readable = sorted(durations)
    batches = plan_decode_batches([durations[i] for i in readable], batch_size, max_batch_audio_s)
    cpt = chars_per_token(model.tokenizer)
    watch = Stopwatch(next(model.parameters()).device)
    audio_s = 0.0
    bar = Progress(len(paths), "transcribing", unit="file", enabled=progress)
    bar.update(len(paths) - len(readable))
    for batch in batches:
        idx = [readable[j] for j in batch]
        waves, kept = [], []
        for i in idx:
            try:
                waves.append(load_audio(paths[i]))
                kept.append(i)
            except AudioReadError as err:
                records[i] = {"path": str(paths[i]), "error": str(err)}
                logger.error("skipping %s", err)
        if waves:
            with watch:
                results = decode_waveforms(model, waves, prompt, options, tokenizer_chars_per_token=cpt)
            for i, wave, res in zip(kept, waves, results):
                duration_s = len(wave) / SAMPLE_RATE_HZ
                audio_s += duration_s
                records[i] = {
                    "path": str(paths[i]),
                    "text": res.text,
                    "duration_s": round(duration_s, 3),
                    "num_new_tokens": res.num_new_tokens,
                    "finished": res.finished,
                }
                if not res.finished:
                    logger.debug("%s: no end of turn within %d new tokens", paths[i], res.budget)
        bar.update(len(idx), postfix=f"RTFx {audio_s / max(watch.seconds, 1e-9):.1f}")
    bar.close()
    done = [r for r in records if r is not None and "text" in r]
    failed = [r for r in records if r is not None and "error" in r]
    summary = {
        "records": records,
        "files": len(paths),
        "transcribed": len(done),
        "failed": len(failed),
        "audio_s": round(audio_s, 3),
        "inference_s": round(watch.seconds, 3),
        "rtfx": round(audio_s / watch.seconds, 2) if watch.seconds > 0 else None,
    }
    cut = sum(1 for r in done if not r["finished"])
    if cut:
        logger.warning(
            "%d of %d transcript(s) reached their token budget without an end-of-turn token and were cut there "
            "(an untrained or looping model; raise generation.max_new_tokens / chars_per_second if speech is fast)",
            cut,
            len(done),
        )
    if failed:
        logger.error(
            "%d of %d file(s) could not be read: %s", len(failed), len(paths), [r["path"] for r in failed]
        )
    return summary


def write_transcripts(records: Sequence[dict], output: str | os.PathLike) -> Path:
    """Write records as JSON Lines (``.jsonl``/``.json``) or as ``path<TAB>text`` lines (any other suffix).

    Failed files are written with their ``error`` in JSON Lines and skipped in text output.
    """
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            if out.suffix.lower() in (".jsonl", ".json"):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            elif "text" in r:
                f.write(f"{r['path']}\t{r['text']}\n")
    return out


def transcribe(cfg: DictConfig) -> dict:
    """Run the transcription task from the composed ``conf/transcribe.yaml``.

    Returns:
        :func:`transcribe_files`'s summary plus ``output`` (the written file).

    Raises:
        FileNotFoundError: if ``audio`` matches no file or the checkpoint is missing.
    """
    audio = cfg.audio
    audio = OmegaConf.to_container(audio) if OmegaConf.is_list(audio) else str(audio)
    files = find_audio_files(audio)
    logger.info("%d audio file(s) to transcribe", len(files))
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
    )
    output = cfg.get("output") or Path(cfg.paths.output_dir) / "transcripts.jsonl"
    result["output"] = str(write_transcripts([r for r in result["records"] if r is not None], output))
    logger.info(
        "transcribed %d of %d file(s), %.1f s of audio in %.1f s (RTFx %s); written to %s",
        result["transcribed"],
        result["files"],
        result["audio_s"],
        result["inference_s"],
        result["rtfx"],
        result["output"],
    )
    return result
