"""Long-form LibriSpeech: the utterances of each chapter re-joined in reading order.

LibriSpeech (Panayotov et al. 2015) cut each audiobook chapter into utterances of at most ~35 s. Joining a chapter's
utterances back in utterance order gives minutes-long recordings with exact transcripts, so long-form WER is
measured on the same speech and references as the short-form test sets (Aero-1-Audio reports long-form WER on the
LibriSpeech test sets re-joined this way). The official layout is
``<root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` (lines ``<speaker>-<chapter>-<utt> TRANSCRIPT``) next
to ``<speaker>-<chapter>-<utt>.flac``; :func:`aero_lightning.data.readers.read_librispeech_folder` reads it.

The audio of a chapter is the utterances' audio concatenated (no gap by default: the corpus's segmentation removed
the pauses between them), and the reference is their transcripts joined by single spaces. A chapter with an
utterance that has no audio or no transcript is skipped whole (with the reason), because a gap would make every
later word misaligned with the reference.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aero_lightning.data.audio_io import load_audio
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.readers import read_librispeech_folder

logger = logging.getLogger(__name__)

__all__ = ["LongformItem", "librispeech_chapters", "load_longform_audio", "utterance_order"]

_KEY = re.compile(r"^(\d+)-(\d+)-(\d+)$")


def utterance_order(key: str) -> tuple[str, int]:
    """``("<speaker>-<chapter>", utterance number)`` of a LibriSpeech key such as ``"1089-134686-0012"``.

    Raises:
        ValueError: if the key is not ``<digits>-<digits>-<digits>``.
    """
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"{key!r} is not a LibriSpeech utterance key <speaker>-<chapter>-<utterance>")
    return f"{m.group(1)}-{m.group(2)}", int(m.group(3))


@dataclass(frozen=True)
class LongformItem:
    """One re-joined chapter.

    Attributes:
        key: ``"<speaker>-<chapter>"``.
        utterance_keys: the utterances in reading order.
        audio_paths: their audio files, same order.
        text: the transcripts joined by single spaces.
    """

    key: str
    utterance_keys: tuple[str, ...]
    audio_paths: tuple[str, ...]
    text: str


def librispeech_chapters(root: str | os.PathLike) -> tuple[list[LongformItem], list[dict[str, str]]]:
    """Group a LibriSpeech-layout folder into chapters.

    Args:
        root: a subset folder (``LibriSpeech/test-clean``) or any folder below which the layout appears.

    Returns:
        ``(chapters, rejected)``: chapters sorted by key, utterances sorted by their number (numerically);
        ``rejected`` lists ``{"key", "reason", "detail"}`` for skipped chapters (``missing_audio``,
        ``missing_transcript``, ``bad_key``).

    Raises:
        FileNotFoundError: if ``root`` is missing or holds no LibriSpeech files.
    """
    groups: dict[str, list[tuple[int, object]]] = {}
    rejected: list[dict[str, str]] = []
    for item in read_librispeech_folder(root):
        try:
            chapter, number = utterance_order(item.key)
        except ValueError as err:
            rejected.append({"key": item.key, "reason": "bad_key", "detail": str(err)})
            continue
        groups.setdefault(chapter, []).append((number, item))
    chapters = []
    for chapter in sorted(groups):
        utts = [u for _, u in sorted(groups[chapter], key=lambda t: t[0])]
        no_audio = [u.key for u in utts if u.audio_path is None]
        no_text = [u.key for u in utts if u.text is None or not u.text.strip()]
        if no_audio or no_text:
            reason = "missing_audio" if no_audio else "missing_transcript"
            detail = (
                f"utterances without {'audio' if no_audio else 'transcript'}: {(no_audio or no_text)[:5]}"
            )
            rejected.append({"key": chapter, "reason": reason, "detail": detail})
            logger.warning("skipping chapter %s: %s", chapter, detail)
            continue
        chapters.append(
            LongformItem(
                key=chapter,
                utterance_keys=tuple(u.key for u in utts),
                audio_paths=tuple(u.audio_path for u in utts),
                text=" ".join(u.text.strip() for u in utts),
            )
        )
    return chapters, rejected


def join_waveforms(waveforms: Sequence[np.ndarray], gap_s: float = 0.0) -> np.ndarray:
    """Concatenate 16 kHz waveforms with ``gap_s`` seconds of silence between consecutive ones."""
    gap = np.zeros(round(gap_s * SAMPLE_RATE_HZ), dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, w in enumerate(waveforms):
        if i and gap.size:
            parts.append(gap)
        parts.append(np.asarray(w, dtype=np.float32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def load_longform_audio(item: LongformItem, gap_s: float = 0.0) -> np.ndarray:
    """The chapter's audio: its utterances read (16 kHz mono) and joined in order.

    Raises:
        aero_lightning.data.audio_io.AudioReadError: if an utterance cannot be read.
    """
    return join_waveforms([load_audio(Path(p)) for p in item.audio_paths], gap_s)
