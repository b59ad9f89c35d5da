"""Recordings longer than one pass: overlapping chunks, and the merge of their texts.

One pass puts every 30 s window of a recording into one LLM context, next to the prompt and the reply. A pass can
hold what the LLM's context holds: ``audio tokens(d) + prompt tokens + new-token budget(d) <= context``
(:func:`max_pass_samples`), further capped by ``max_pass_s`` (15 minutes by default: Aero-1-Audio's stated single
pass). A longer recording is cut into chunks and each chunk is decoded alone.

Chunks (:func:`plan_chunks`) follow transformers' ASR pipeline (``chunk_iter`` in
``transformers/pipelines/automatic_speech_recognition.py``): chunks of ``chunk`` samples start every
``chunk - 2 x stride`` samples, from 0, until a chunk reaches the end; ``stride`` is the overlap on each side of a
chunk (the pipeline's ``stride_length_s``), so consecutive chunks share ``2 x stride`` samples.

Merge (:func:`merge_chunk_texts`) is the rule transformers' pipeline applies to the token ids of sequence-to-sequence
chunks (``_find_longest_common_sequence``), here on words: for each next chunk, every alignment of the text so far's
last ``i`` words with the chunk's first ``i`` words is scored ``matches / i + i / 10000`` (the small term prefers
the longer of two perfect matches); the best alignment with more than one matching word wins, and the chunk's first
``i`` words are dropped before its text is appended. Without such an alignment the whole chunk is appended. Words
are compared case-folded with surrounding punctuation removed, so "Well," matches "well".

This module is copied into exported model folders as remote code: it imports only the standard library and numpy.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["max_pass_samples", "merge_chunk_texts", "merge_word_lists", "plan_chunks"]

_PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u2026"
_LONGEST_SEARCHED_SAMPLES = 16000 * 3600 * 24  # a day of 16 kHz audio bounds the search of max_pass_samples


def plan_chunks(num_samples: int, chunk_samples: int, stride_samples: int) -> list[tuple[int, int]]:
    """``[start, end)`` sample ranges of the chunks of a recording (module docstring).

    Args:
        num_samples: the recording's length in samples.
        chunk_samples: samples per chunk.
        stride_samples: overlap on each side of a chunk, in samples (consecutive chunks share twice this).

    Returns:
        ``[(0, num_samples)]`` when the recording fits one chunk, else the chunks in order; the last one ends at
        ``num_samples`` and may be shorter.

    Raises:
        ValueError: if ``chunk_samples <= 2 * stride_samples`` (chunks would not advance) or a length is negative.
    """
    if num_samples < 0 or stride_samples < 0 or chunk_samples < 1:
        raise ValueError(f"bad chunking: {num_samples=}, {chunk_samples=}, {stride_samples=}")
    if num_samples <= chunk_samples:
        return [(0, num_samples)]
    step = chunk_samples - 2 * stride_samples
    if step <= 0:
        raise ValueError(
            f"a chunk ({chunk_samples} samples) must be longer than twice its stride ({stride_samples} samples)"
        )
    chunks = []
    for start in range(0, num_samples, step):
        end = min(start + chunk_samples, num_samples)
        chunks.append((start, end))
        if end >= num_samples:
            break
    return chunks


def _key(word: str) -> str:
    return word.strip(_PUNCTUATION).casefold()


def merge_word_lists(chunks: Sequence[Sequence[str]]) -> list[str]:
    """Merge the words of consecutive overlapping chunks (module docstring: transformers' rule on words).

    Args:
        chunks: each chunk's words, in order.

    Returns:
        The merged words: all of the first chunk, then each next chunk without the words its best alignment with
        the text so far found in the overlap.
    """
    ids: dict[str, int] = {}  # word key -> integer, so that alignments compare integer arrays

    def encode(words: Sequence[str]) -> np.ndarray:
        return np.array([ids.setdefault(_key(w), len(ids)) for w in words], dtype=np.int64)

    merged: list[str] = []
    for words in chunks:
        words = list(words)
        if not merged:
            merged = words
            continue
        left = encode(merged[-len(words) :])
        right = encode(words)
        index, best = 0, 0.0
        for i in range(1, min(len(left), len(right)) + 1):
            matches = int(np.sum(left[len(left) - i :] == right[:i]))
            score = matches / i + i / 10000.0
            if matches > 1 and score > best:
                index, best = i, score
        merged.extend(words[index:])
    return merged


def merge_chunk_texts(texts: Sequence[str]) -> str:
    """:func:`merge_word_lists` on whitespace-split chunk texts, joined by single spaces."""
    return " ".join(merge_word_lists([t.split() for t in texts]))


def max_pass_samples(
    context_tokens: int | None,
    prompt_tokens: int,
    audio_tokens: Callable[[int], int],
    budget_tokens: Callable[[int], int],
    cap_samples: int | None = None,
) -> int | None:
    """The longest recording one pass holds, in samples.

    Args:
        context_tokens: the LLM's context length (``max_position_embeddings``); None when unknown.
        prompt_tokens: tokens of the prompt besides the ``<|AUDIO|>`` slots (chat template, instruction).
        audio_tokens: samples -> ``<|AUDIO|>`` slots of a clip (non-decreasing).
        budget_tokens: samples -> new-token budget of a clip (non-decreasing).
        cap_samples: a configured upper bound (``max_pass_s x 16000``), or None.

    Returns:
        The largest ``n <= cap_samples`` with ``audio_tokens(n) + prompt_tokens + budget_tokens(n) <=
        context_tokens``; ``cap_samples`` when the context is unknown (None when both are).

    Raises:
        ValueError: if not even one sample fits the context.
    """
    if context_tokens is None:
        return cap_samples

    def fits(n: int) -> bool:
        return audio_tokens(n) + prompt_tokens + budget_tokens(n) <= context_tokens

    if not fits(1):
        raise ValueError(
            f"the LLM's context of {context_tokens} tokens cannot hold a prompt of {prompt_tokens} tokens, one "
            f"clip's audio slots and its reply budget ({budget_tokens(1)} tokens)"
        )
    hi = cap_samples if cap_samples is not None else _LONGEST_SEARCHED_SAMPLES
    if fits(hi):
        return hi
    lo = 1  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
