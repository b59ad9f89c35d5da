"""The one counter of skipped inputs, and the one table of the reasons an input can be skipped for.

Every reader of the project skips bad inputs instead of failing: corpus preparation (:mod:`.prepare`, :mod:`.synth`)
lists them in the manifest, the training stream and the validation / test passes (:mod:`.stream`,
:mod:`.datamodule`) and the benchmark sources (:mod:`aero_lightning.eval.sources`) count them with
:class:`RejectCounter`. All of them name the cause with a key of :data:`REJECT_REASONS`, so one reason means the
same thing wherever it is reported; :class:`RejectCounter` refuses a reason that is not in the table, which keeps
the table complete. The module imports only the standard library.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)

__all__ = ["REJECT_REASONS", "RejectCounter", "check_reason"]

REJECT_REASONS: dict[str, str] = {
    # ---- preparing corpora (prepare.py, synth.py; listed in manifest.json) and reading benchmark sources
    "missing_audio": "no audio for the input: a transcript line, metadata row or JSON Lines row without an audio "
    "file, or a long-form chapter with an utterance that has no audio",
    "missing_transcript": "an audio file without a transcript line, a null text value, or a long-form chapter with "
    "an utterance that has no transcript",
    "missing_text": "an evaluation sample (JSON Lines row, LibriSpeech utterance, HF row) without a reference text",
    "empty_text": "the transcript / caption / answer / label, or a shard sample's assistant reply, is empty after "
    "stripping whitespace",
    "empty_question": "an aqa sample without a question",
    "unlabelled": "the corpus gives the clip no usable label (e.g. IEMOCAP 'xxx': annotators disagreed)",
    "unreadable_row": "the dataset row could not be read",
    "unreadable_audio": "the audio file or cell could not be read or decoded",
    "missing_file": "a named audio file does not exist",
    "empty_file": "an audio file is empty (0 bytes) or its header gives no samples",
    "truncated_file": "an audio file's data stops before the length its header gives (a cut-off copy)",
    "empty_audio": "the audio has no samples (in a shard: or its JSON duration_s is under one sample)",
    "non_finite_audio": "the waveform contains NaN or inf",
    "too_long": "longer than max_duration_s",
    "encode_failed": "FLAC encoding failed",
    "duplicate_key": "the sample key repeats within its shard",
    "synthesis_failed": "espeak-ng could not synthesise the sentence (demo corpus)",
    # ---- reading prepared shards (training stream, validation / test passes, benchmark shard sources)
    "unreadable_shard": "a shard file is missing or cannot be opened; none of its samples are read",
    "truncated_tar": "a shard ends inside a tar member; the samples before the damage are kept",
    "missing_samples": "samples the manifest lists for a shard that the shard did not yield (lost in an "
    "unreadable or truncated shard), counted once per lost sample",
    "missing_member": "a shard sample lacks its .json member or an audio member (.flac, .wav, .ogg, .mp3)",
    "bad_json": "a JSON member or JSON Lines row does not parse, or a shard sample's JSON lacks duration_s or "
    "messages",
    "bad_messages": "the sample's chat messages cannot be tokenised (unknown part type, audio part count mismatch)",
    "over_budget": "the tokenised sample (audio slots + text) is longer than the packing length",
    "corrupt_audio": "a shard sample's audio member cannot be decoded",
    "sample_rate": "a shard sample's audio is not 16 kHz (re-prepare the corpus)",
    "not_mono": "a shard sample's audio has more than one channel (re-prepare the corpus)",
    "duration_mismatch": "the decoded audio fills a different number of audio tokens than its JSON duration_s",
    # ---- training on cached encoder outputs (data.encoder_cache=true, data/encoder_cache.py)
    "missing_cache_entry": "a shard sample with audio has no entry in the encoder cache (and the cache build did not "
    "skip it for a reason of its own)",
    "bad_cache_entry": "an encoder cache entry cannot be read, or its frames do not fit the sample's clips",
    # ---- benchmark sources only (eval/sources.py, eval/longform.py)
    "bad_choices": "a multiple-choice sample with fewer than two options, or options that do not parse",
    "answer_not_in_choices": "a multiple-choice sample whose answer is not one of its options",
    "bad_key": "a LibriSpeech key that is not <speaker>-<chapter>-<utterance> (long-form grouping needs it)",
    "empty_reference": "an ASR sample whose reference is empty after Whisper's English normaliser (or TED-LIUM's "
    "ignore marker): dropped before decoding, as the Open ASR Leaderboard filters its datasets (eval.py)",
}
"""Reason -> one-line meaning of every category an input can be skipped for (manifests, logs, eval summaries)."""


def check_reason(reason: str) -> str:
    """Return ``reason`` if it is a key of :data:`REJECT_REASONS`.

    Args:
        reason: a skip category, e.g. ``"corrupt_audio"``.

    Returns:
        ``reason`` unchanged.

    Raises:
        ValueError: if the reason is not in :data:`REJECT_REASONS` (add it there, with its meaning).
    """
    if reason not in REJECT_REASONS:
        raise ValueError(
            f"unknown reject reason {reason!r}; add it with its meaning to "
            f"aero_lightning.data.rejects.REJECT_REASONS (known: {', '.join(sorted(REJECT_REASONS))})"
        )
    return reason


def _logged(before: int, after: int) -> bool:
    """Whether a count going from ``before`` to ``after`` reaches 1..10 or a power of ten (100, 1000, ...)."""
    if before < 10:
        return True
    power = 10 ** len(str(before))  # the smallest power of ten above ``before``
    return power <= after


class RejectCounter(Counter):
    """Counts skipped inputs by reason (a :class:`collections.Counter` ``{reason: count}``) and logs them.

    The first ten inputs of each reason are logged with their key and cause, then only the 100th, 1000th, ...
    so a corpus full of one defect does not flood the log.
    """

    def reject(self, reason: str, key: str, detail: str = "", *, count: int = 1, log: bool = True) -> None:
        """Count skipped inputs of one reason.

        Args:
            reason: a key of :data:`REJECT_REASONS`, e.g. ``"corrupt_audio"``.
            key: the sample key or shard url.
            detail: human-readable cause.
            count: how many inputs this call skips (>= 1; e.g. the samples lost in a truncated shard).
            log: log as described in the class docstring; ``False`` when the caller already logged the input.

        Raises:
            ValueError: if ``reason`` is not in :data:`REJECT_REASONS` or ``count < 1``.
        """
        check_reason(reason)
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        before = self[reason]
        self[reason] = before + count
        if log and _logged(before, before + count):
            logger.warning("skipping %s: %s %s (%s so far: %d)", key, reason, detail, reason, before + count)
