"""Repetition guard: stop a generation that has fallen into a loop.

A decoder that loses track of the audio can repeat a few tokens until its budget runs out: a 3-minute file decoded
``cicici...`` for 8192 tokens and four minutes. The guard is a transformers ``StoppingCriteria`` checked after every
new token, so such a sequence ends within tens of tokens of the loop's start.

Rule. For every n-gram length ``n = 1 .. max_ngram`` (tokens), a sequence is stopped as soon as its last
``span(n) = n * max(min_repeats, ceil(min_tokens / n))`` generated tokens are ``span(n) / n`` back-to-back copies
of one n-gram, i.e. ``tokens[j] == tokens[j - n]`` for every one of the last ``span(n) - n`` positions. With the
defaults (``max_ngram`` 32, ``min_repeats`` 4, ``min_tokens`` 40) a one-token loop stops after 40 tokens, a
6-token phrase after 7 copies (42 tokens) and a 20-token sentence after 4 copies (80 tokens).

Why tokens and a token floor. The scoring measure of loops (:mod:`aero_lightning.metrics.repetition`: a word n-gram,
n <= 4, 5 or more times in a row after normalisation) works on words, but a loop inside one word (``cicicici``) has
no word boundary, so the guard compares token ids. Short repeats are speech ("no no no", and "1000000" is seven
tokens with Qwen's one-token digits), so a stop also needs ``min_tokens`` tokens of repetition; stopping early
loses the rest of the recording, which is worse than a few repeated words.

The reply is kept as generated up to the stop (the copies included) and flagged by the callers
(``stopped_by_repetition_guard``). :meth:`RepetitionGuard.find_stop` finds the stop in a returned sequence from the
tokens alone, so a caller can flag it without state from ``generate`` (beam search reorders its rows). This module
is copied into exported model folders as remote code, so it imports only numpy, torch and transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria

__all__ = ["RepetitionGuard", "RepetitionStoppingCriteria", "repetition_guard_from"]


@dataclass(frozen=True)
class RepetitionGuard:
    """Settings of the repetition guard (module docstring).

    Attributes:
        max_ngram: longest repeated unit looked for, in tokens.
        min_repeats: back-to-back copies of the unit that stop generation.
        min_tokens: tokens the copies must cover together before generation stops.

    Raises:
        ValueError: for ``max_ngram < 1``, ``min_repeats < 2`` or ``min_tokens < 1``.
    """

    max_ngram: int = 32
    min_repeats: int = 4
    min_tokens: int = 40

    def __post_init__(self) -> None:
        if self.max_ngram < 1 or self.min_repeats < 2 or self.min_tokens < 1:
            raise ValueError(
                f"repetition guard needs max_ngram >= 1, min_repeats >= 2, min_tokens >= 1; got {self.to_dict()}"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def span(self, n: int) -> int:
        """Tokens of back-to-back copies of an ``n``-token unit that stop generation."""
        return n * max(self.min_repeats, math.ceil(self.min_tokens / n))

    def find_stop(self, tokens: Sequence[int]) -> int | None:
        """Where the guard stops a sequence, from its tokens alone.

        Args:
            tokens: generated token ids (prompt excluded).

        Returns:
            The length of the shortest prefix of ``tokens`` that the guard stops (it stopped generation right after
            that many tokens), or None if no prefix ends in a loop.
        """
        t = np.asarray(list(tokens), dtype=np.int64)
        first: int | None = None
        for n in range(1, self.max_ngram + 1):
            span = self.span(n)
            if len(t) < span:
                continue
            need = span - n  # consecutive positions j with t[j] == t[j - n]
            differs = np.concatenate([[0], np.cumsum(t[n:] != t[:-n])])  # (len - n + 1,)
            hits = np.flatnonzero(differs[need:] == differs[:-need])  # windows of `need` equal positions
            if hits.size:
                stop = int(hits[0]) + span  # prefix length whose last `span` tokens are the copies
                first = stop if first is None else min(first, stop)
        return first

    def criterion(self, num_beams: int = 1) -> RepetitionStoppingCriteria:
        """A fresh stopping criterion for one ``generate`` call with ``num_beams`` beams (1: greedy or sampling)."""
        return RepetitionStoppingCriteria(self, stable_rows=num_beams == 1)


class RepetitionStoppingCriteria(StoppingCriteria):
    """transformers ``StoppingCriteria`` of a :class:`RepetitionGuard`; use one instance per ``generate`` call.

    The sequences it sees may or may not start with the prompt (decoder-only models given ``inputs_embeds`` see only
    the new tokens); the first call, made after the first new token, records where the new tokens start, so a
    prompt's own repetitions (hundreds of ``<|AUDIO|>`` slots) never stop anything.

    Greedy decoding and sampling keep each row the same sequence, one token longer per call, so the criterion keeps,
    for every row and n-gram length ``n``, the run of newest positions with ``tokens[j] == tokens[j - n]`` and
    updates it from the newest token alone (a few small tensor operations per step, whatever the length). Beam
    search reorders its rows between calls, so there each call checks the rule on the newest tokens directly.

    Args:
        guard: the settings.
        stable_rows: each call's row ``b`` is the previous call's row ``b`` plus one token (``num_beams == 1``).
    """

    def __init__(self, guard: RepetitionGuard, stable_rows: bool = True):
        self.guard = guard
        self.stable_rows = bool(stable_rows)
        self._ngram = torch.arange(1, guard.max_ngram + 1)  # (N,)
        self._need = torch.tensor([guard.span(n) - n for n in range(1, guard.max_ngram + 1)])  # (N,)
        self._start: int | None = None
        self._runs: torch.Tensor | None = None  # (B, N) runs ending at the newest token, capped at need
        self._length = 0

    def _recount(self, new: torch.Tensor) -> torch.BoolTensor:
        """``(B,)`` the rule checked on the newest tokens of ``new`` ``(B, T)`` directly."""
        fired = torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
        for n in range(1, self.guard.max_ngram + 1):
            span = self.guard.span(n)
            if new.shape[1] >= span:
                fired |= (new[:, -(span - n) :] == new[:, -span:-n]).all(dim=1)
        return fired

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """``(B,)`` True for each sequence whose newest tokens are a loop (module rule)."""
        if self._start is None:
            self._start = input_ids.shape[1] - 1
        new = input_ids[:, self._start :]  # (B, T_new)
        batch, length = new.shape
        if not self.stable_rows:
            return self._recount(new)
        ngram, need = self._ngram.to(new.device), self._need.to(new.device)
        if self._runs is None or self._runs.shape[0] != batch or length != self._length + 1:
            # the first call, or rows that are not the last call's rows one token on: count from the tokens
            runs = torch.zeros((batch, len(ngram)), dtype=torch.long, device=new.device)
            for n in range(1, min(self.guard.max_ngram, length - 1) + 1):
                equal = new[:, n:] == new[:, :-n]  # (B, T - n)
                trailing = torch.cumprod(equal.flip(1).long(), dim=1).sum(dim=1)  # (B,)
                runs[:, n - 1] = trailing
        else:
            back = (length - 1 - ngram).clamp_min(0)  # (N,): the position n tokens before the newest
            equal = (new[:, back] == new[:, -1:]) & (ngram <= length - 1)  # (B, N)
            runs = torch.where(equal, self._runs + 1, 0)
        self._runs = torch.minimum(runs, need)
        self._length = length
        return (self._runs >= need).any(dim=1)


def repetition_guard_from(value: Any) -> RepetitionGuard | None:
    """A :class:`RepetitionGuard` from a config value.

    Args:
        value: None or False (no guard), True (defaults), a :class:`RepetitionGuard`, or a mapping of its fields
            with an optional ``enabled`` key (``{"enabled": false}`` turns it off).

    Returns:
        The guard, or None when it is off.

    Raises:
        ValueError: for another type, or settings :class:`RepetitionGuard` refuses.
        TypeError: for an unknown key in a mapping.
    """
    if value is None or value is False:
        return None
    if value is True:
        return RepetitionGuard()
    if isinstance(value, RepetitionGuard):
        return value
    if isinstance(value, Mapping):
        fields = dict(value)
        if not fields.pop("enabled", True):
            return None
        return RepetitionGuard(**{k: int(v) for k, v in fields.items()})
    raise ValueError(f"repetition_guard must be a mapping, true/false or null, got {value!r}")
