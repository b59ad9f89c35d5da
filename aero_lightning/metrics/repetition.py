"""Hallucination loops: hypotheses in which one word n-gram repeats back to back many times.

An LLM decoder that loses track of the audio often emits a phrase over and over ("thank you. thank you. thank
you. ...") until its token budget runs out; on long-form audio this dominates the insertion count. The measure here
finds, for every hypothesis, the longest *tandem repeat*: the most consecutive copies of any word n-gram
(n = 1 .. ``max_n``). A hypothesis is a loop if some n-gram occurs ``min_repeats`` or more times in a row. Words
are those of the (normalised) hypothesis.

Algorithm: a run of ``r`` consecutive positions ``j`` with ``words[j] == words[j + n]`` is a stretch of period
``n`` and length ``r + n`` words, i.e. ``floor((r + n) / n)`` copies of its first n-gram; one pass per ``n``
(O(``max_n`` x words)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["RepetitionResult", "longest_tandem_repeat", "repetition_stats"]


def longest_tandem_repeat(words: Sequence[str], max_n: int = 4) -> tuple[int, int, tuple[str, ...]]:
    """The most back-to-back copies of any n-gram in ``words``.

    Args:
        words: tokens (words) of one hypothesis.
        max_n: longest n-gram considered.

    Returns:
        ``(copies, n, ngram)``: the number of consecutive copies (1 when nothing repeats), the n-gram length, and
        the n-gram. Ties prefer the shorter n-gram.

    Raises:
        ValueError: if ``max_n < 1``.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    best = (1, 1, tuple(words[:1]))
    for n in range(1, max_n + 1):
        run = 0
        for j in range(len(words) - n):
            if words[j] == words[j + n]:
                run += 1
                copies = (run + n) // n
                if copies > best[0]:
                    start = j + 1 - run
                    best = (copies, n, tuple(words[start : start + n]))
            else:
                run = 0
    return best


@dataclass(frozen=True)
class RepetitionResult:
    """Loop statistics of one dataset.

    Attributes:
        num_hypotheses: hypotheses examined.
        num_loops: hypotheses whose longest tandem repeat has at least ``min_repeats`` copies.
        loop_rate: ``num_loops / num_hypotheses`` (0 for no hypotheses).
        max_copies: the largest copy count over the dataset.
        min_repeats: the threshold used.
        max_n: the longest n-gram considered.
        loop_indices: indices of the looping hypotheses (at most 100 kept).
    """

    num_hypotheses: int
    num_loops: int
    loop_rate: float
    max_copies: int
    min_repeats: int
    max_n: int
    loop_indices: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def repetition_stats(
    hypotheses: Sequence[str], min_repeats: int = 5, max_n: int = 4, normalize: bool = True
) -> RepetitionResult:
    """Count hallucination loops in a dataset's hypotheses.

    Args:
        hypotheses: decoded texts.
        min_repeats: copies in a row that make a loop (5: "the the the the the").
        max_n: longest n-gram considered.
        normalize: apply Whisper's English normaliser first (as WER does), so punctuation does not hide repeats.

    Returns:
        :class:`RepetitionResult`.
    """
    if min_repeats < 2:
        raise ValueError(f"min_repeats must be >= 2, got {min_repeats}")
    if normalize:
        from aero_lightning.metrics.wer import normalize_english

        hypotheses = [normalize_english(h) for h in hypotheses]
    loops, max_copies = [], 0
    for i, hyp in enumerate(hypotheses):
        copies, _, _ = longest_tandem_repeat(hyp.split(), max_n)
        max_copies = max(max_copies, copies)
        if copies >= min_repeats:
            loops.append(i)
    count = len(hypotheses)
    return RepetitionResult(
        num_hypotheses=count,
        num_loops=len(loops),
        loop_rate=len(loops) / count if count else 0.0,
        max_copies=max_copies,
        min_repeats=min_repeats,
        max_n=max_n,
        loop_indices=loops[:100],
    )
