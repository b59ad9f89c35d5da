"""Word error rate the way the Open ASR Leaderboard reports it.

Procedure (Open ASR Leaderboard, https://github.com/huggingface/open_asr_leaderboard, ``normalizer/`` and the
per-dataset ``run_eval.py`` scripts):

1. Normalise reference and hypothesis with Whisper's English text normaliser (Radford et al. 2022, "Robust Speech
   Recognition via Large-Scale Weak Supervision", appendix C). The PyPI package ``whisper-normalizer`` ships the
   British -> American spelling map that the normaliser needs.
2. Drop samples whose *normalised reference* is empty (e.g. a reference that is only "uh" or "um", which the
   normaliser removes as fillers) or is TED-LIUM's "ignore_time_segment_in_scoring" marker (normalised:
   "ignore time segment in scoring"; the leaderboard's ``is_target_text_in_range`` drops it too).
3. Pool errors over the remaining samples of one dataset: WER = (S + D + I) / N_ref, with S/D/I from a word-level
   Levenshtein alignment per utterance (jiwer), summed over utterances. This is *not* the mean of per-utterance WERs.
4. Report the unweighted mean of the per-dataset WERs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import jiwer

__all__ = [
    "IGNORED_REFERENCES",
    "WERResult",
    "corpus_wer",
    "is_scored_reference",
    "mean_wer",
    "normalize_english",
]

_NORMALIZER = None

IGNORED_REFERENCES = frozenset({"ignore time segment in scoring"})
"""Normalised references that mark unscored segments (TED-LIUM); such samples are dropped like empty ones."""


def is_scored_reference(normalized_reference: str) -> bool:
    """True if a normalised reference counts: not empty and not an ignore marker (:data:`IGNORED_REFERENCES`)."""
    text = normalized_reference.strip()
    return bool(text) and text not in IGNORED_REFERENCES


def _english_normalizer():
    """Return the module-level ``EnglishTextNormalizer``, built on first use (it compiles many regexes)."""
    global _NORMALIZER
    if _NORMALIZER is None:
        from whisper_normalizer.english import EnglishTextNormalizer

        _NORMALIZER = EnglishTextNormalizer()
    return _NORMALIZER


def normalize_english(text: str) -> str:
    """Normalise English text with Whisper's ``EnglishTextNormalizer``.

    Lower-cases, removes punctuation and fillers ("uh", "um", "hmm", ...), expands contractions and titles
    ("Mr." -> "mister"), standardises numbers ("twenty five dollars" -> "$25") and British spellings
    ("colour" -> "color"). Source: Radford et al. 2022, appendix C; as used by the Open ASR Leaderboard.

    Args:
        text: Raw transcript.

    Returns:
        The normalised transcript, words separated by single spaces; may be empty.
    """
    return _english_normalizer()(text)


@dataclass(frozen=True)
class WERResult:
    """Pooled word error counts for one dataset.

    Attributes:
        wer: (substitutions + deletions + insertions) / num_ref_words; ``nan`` when no sample was scored.
        substitutions: Substituted reference words, summed over scored samples.
        deletions: Deleted reference words, summed over scored samples.
        insertions: Inserted hypothesis words, summed over scored samples.
        hits: Correct reference words, summed over scored samples.
        num_ref_words: Reference words over scored samples (= hits + substitutions + deletions).
        num_samples: Scored samples (pairs kept after dropping empty references).
        num_dropped: Samples dropped because their normalised reference is empty.
    """

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    num_ref_words: int
    num_samples: int
    num_dropped: int

    def to_dict(self) -> dict[str, float | int]:
        """Return the fields as a plain ``dict`` (for logging / JSON)."""
        return asdict(self)


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> WERResult:
    """Corpus-level (pooled) WER as reported by the Open ASR Leaderboard.

    Source: https://github.com/huggingface/open_asr_leaderboard (Whisper normaliser, then jiwer over all samples
    with a non-empty normalised reference).

    Args:
        references: Reference transcripts, one per sample.
        hypotheses: Hypothesis transcripts, aligned with ``references``.
        normalize: Apply :func:`normalize_english` to both sides first. If False, texts are only split on
            whitespace.

    Returns:
        The pooled counts. Pairs whose (normalised) reference is empty or an ignore marker are dropped and
        counted in ``num_dropped``; an empty hypothesis scores all reference words as deletions. If every pair
        is dropped (or the inputs are empty), ``wer`` is ``float("nan")`` and ``num_samples`` is 0.

    Raises:
        ValueError: If ``references`` and ``hypotheses`` differ in length.
    """
    if len(references) != len(hypotheses):
        raise ValueError(
            f"references and hypotheses differ in length: {len(references)} references vs "
            f"{len(hypotheses)} hypotheses"
        )
    if normalize:
        references = [normalize_english(r) for r in references]
        hypotheses = [normalize_english(h) for h in hypotheses]
    kept = [(r, h) for r, h in zip(references, hypotheses) if is_scored_reference(r)]
    num_dropped = len(references) - len(kept)
    if not kept:
        return WERResult(
            wer=math.nan,
            substitutions=0,
            deletions=0,
            insertions=0,
            hits=0,
            num_ref_words=0,
            num_samples=0,
            num_dropped=num_dropped,
        )
    out = jiwer.process_words([r for r, _ in kept], [h for _, h in kept])
    num_ref_words = out.hits + out.substitutions + out.deletions
    errors = out.substitutions + out.deletions + out.insertions
    return WERResult(
        wer=errors / num_ref_words,
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
        hits=out.hits,
        num_ref_words=num_ref_words,
        num_samples=len(kept),
        num_dropped=num_dropped,
    )


def mean_wer(results: Mapping[str, WERResult]) -> float:
    """Unweighted mean of per-dataset WERs (the leaderboard's "Average WER").

    Each dataset counts once, whatever its number of words.

    Args:
        results: Dataset name -> its :class:`WERResult`.

    Returns:
        The mean of ``result.wer`` over datasets.

    Raises:
        ValueError: If ``results`` is empty or a dataset's WER is ``nan`` (no scored samples).
    """
    if not results:
        raise ValueError("mean_wer needs at least one dataset result")
    nan_names = [name for name, r in results.items() if math.isnan(r.wer)]
    if nan_names:
        raise ValueError(f"datasets with no scored samples (WER is nan): {nan_names}")
    return sum(r.wer for r in results.values()) / len(results)
