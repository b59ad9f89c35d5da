"""Batched generation for evaluation, transcription and WER during training.

One path turns waveforms into text: prompts with ``<|AUDIO|>`` slots are built by the training collator
(:class:`~aero_lightning.data.datamodule.AsrCollator`, left-padded for generation), log-mel is computed on the
model's device, and :meth:`AeroModel.generate` decodes greedily or with beam search.

Generation budget. An untrained or looping model decodes until ``max_new_tokens``, so the budget is scaled to the
audio: ``base_new_tokens + ceil(duration_s * chars_per_second / chars_per_token)``, capped at
``max_new_tokens_cap``, where ``chars_per_token`` is measured on an English sample text with the model's own
tokenizer (about 4.4 for Qwen2.5's BPE, about 1.7 for the demo's 320-token BPE) and ``chars_per_second`` is a fast
speaking rate (25 characters per second is ~250 words per minute). Each sample's output is cut at its own budget,
so a sample decodes to the same text whatever else is in its batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.data.datamodule import AsrCollator
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.packing import float_windows

__all__ = [
    "DecodeResult",
    "GenerationOptions",
    "chars_per_token",
    "decode_waveforms",
    "plan_decode_batches",
    "user_messages",
]

_SAMPLE_TEXT = (
    "The committee met on Thursday afternoon to review the budget for next year. After a long discussion about "
    "rising costs, the members agreed to postpone two projects and to ask the city for additional funding. "
    "Several residents who attended the meeting said they were worried about the condition of the roads, and "
    "one of them asked whether the library would stay open on weekends during the summer."
)
"""English text used to measure a tokenizer's characters per token (written for this purpose)."""


def chars_per_token(tokenizer) -> float:
    """Characters per token of ``tokenizer`` on an English sample text (no special tokens)."""
    ids = tokenizer(_SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    return len(_SAMPLE_TEXT) / max(1, len(ids))


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings.

    Attributes:
        num_beams: 1 = greedy; > 1 = beam search.
        max_new_tokens: a fixed budget for every sample; None scales it to the audio (module docstring).
        base_new_tokens: tokens allowed on top of the duration-scaled part.
        chars_per_second: speaking rate the budget allows for, in characters per second of audio.
        max_new_tokens_cap: upper bound of the scaled budget.
    """

    num_beams: int = 1
    max_new_tokens: int | None = None
    base_new_tokens: int = 16
    chars_per_second: float = 25.0
    max_new_tokens_cap: int = 8192

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        if self.chars_per_second <= 0 or self.max_new_tokens_cap < 1 or self.base_new_tokens < 0:
            raise ValueError("chars_per_second and max_new_tokens_cap must be positive, base_new_tokens >= 0")

    def budget(self, duration_s: float, tokenizer_chars_per_token: float) -> int:
        """New-token budget for a clip of ``duration_s`` seconds.

        Args:
            duration_s: audio length in seconds.
            tokenizer_chars_per_token: :func:`chars_per_token` of the model's tokenizer.

        Returns:
            ``max_new_tokens`` if set, else ``min(cap, base + ceil(duration_s * chars_per_second / cpt))``.
        """
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        scaled = self.base_new_tokens + math.ceil(
            duration_s * self.chars_per_second / tokenizer_chars_per_token
        )
        return int(min(self.max_new_tokens_cap, max(1, scaled)))


@dataclass(frozen=True)
class DecodeResult:
    """One decoded sample.

    Attributes:
        text: the reply, special tokens removed, stripped.
        num_new_tokens: generated tokens up to and including the end-of-turn token (or the budget).
        budget: the sample's ``max_new_tokens``.
        finished: an end-of-turn / eos token was generated within the budget (False: cut at the budget).
    """

    text: str
    num_new_tokens: int
    budget: int
    finished: bool


def user_messages(prompt: str = DEFAULT_ASR_PROMPT) -> list[dict]:
    """The chat of one request: a user turn with the audio followed by ``prompt`` (no assistant turn)."""
    return [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]


def plan_decode_batches(
    durations_s: Sequence[float], batch_size: int, max_batch_audio_s: float | None = None
) -> list[list[int]]:
    """Group sample indices into generation batches, longest first.

    Samples are sorted by duration (descending) so a batch pads little; a batch closes at ``batch_size`` samples or
    when ``len(batch) * longest`` would exceed ``max_batch_audio_s`` (the padded audio the batch holds). A sample
    longer than ``max_batch_audio_s`` gets a batch of its own.

    Args:
        durations_s: per-sample durations in seconds.
        batch_size: most samples per batch (>= 1).
        max_batch_audio_s: padded-audio budget per batch in seconds, or None.

    Returns:
        Lists of indices into ``durations_s``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(durations_s)), key=lambda i: (-durations_s[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = durations_s[current[0]] if current else durations_s[i]
        too_big = max_batch_audio_s is not None and (len(current) + 1) * longest > max_batch_audio_s
        if current and (len(current) >= batch_size or too_big):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.encoder.parameters())
    return param.device, param.dtype


@torch.no_grad()
def decode_waveforms(
    model,
    waveforms: Sequence[np.ndarray],
    prompts: str | Sequence[str] = DEFAULT_ASR_PROMPT,
    options: GenerationOptions | None = None,
    tokenizer_chars_per_token: float | None = None,
    synced_gpus: bool = False,
) -> list[DecodeResult]:
    """Decode one batch of 16 kHz mono waveforms.

    Args:
        model: an :class:`~aero_lightning.model.aero.AeroModel` (eval mode is the caller's choice).
        waveforms: ``(T_i,)`` float32 arrays at 16 kHz; any length (long audio becomes several 30 s windows in one
            LLM context).
        prompts: the instruction after the audio, one for all or one per waveform.
        options: :class:`GenerationOptions` (defaults: greedy, scaled budget).
        tokenizer_chars_per_token: cached :func:`chars_per_token` of the model's tokenizer (computed when None).
        synced_gpus: keep generating until every rank is done (needed when parameters are sharded across ranks,
            whose every forward is a collective).

    Returns:
        One :class:`DecodeResult` per waveform, in order.

    Raises:
        ValueError: on an empty waveform or a prompt count that does not match.
    """
    options = options or GenerationOptions()
    if isinstance(prompts, str):
        prompts = [prompts] * len(waveforms)
    if len(prompts) != len(waveforms):
        raise ValueError(f"{len(prompts)} prompts for {len(waveforms)} waveforms")
    if not waveforms:
        return []
    for i, w in enumerate(waveforms):
        if len(w) == 0:
            raise ValueError(f"waveform {i} is empty")
    tok = model.tokenizer
    cpt = tokenizer_chars_per_token or chars_per_token(tok)
    samples = [
        {"key": str(i), "waveform": np.asarray(w, dtype=np.float32), "messages": user_messages(p)}
        for i, (w, p) in enumerate(zip(waveforms, prompts))
    ]
    collate = AsrCollator(
        tok, model.audio_token_counter(), for_generation=True, end_of_turn_token=model.end_of_turn_token
    )
    batch = collate(samples)
    device, dtype = _model_device_dtype(model)
    # the files' float audio at full precision (training batches carry 16-bit PCM, which is what the shards hold)
    windows, window_lengths = float_windows([s["waveform"] for s in samples], model.audio_token_counter())
    features, feature_lengths = model.compute_features(
        windows.to(device), window_lengths.to(device)
    )  # (W, n_mels, T), (W,)
    budgets = [options.budget(len(w) / SAMPLE_RATE_HZ, cpt) for w in waveforms]
    generated = model.generate(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        features.to(dtype),
        feature_lengths,
        max_new_tokens=max(budgets),
        num_beams=options.num_beams,
        synced_gpus=synced_gpus,
    )  # (B, T_new)
    stops = {i for i in (model.end_of_turn_id, tok.eos_token_id) if i is not None}
    results = []
    for row, budget in zip(generated.tolist(), budgets):
        row = row[:budget]
        end = next((j for j, t in enumerate(row) if t in stops), None)
        kept = row if end is None else row[: end + 1]
        text = tok.decode(kept, skip_special_tokens=True).strip()
        results.append(DecodeResult(text, len(kept), budget, end is not None))
    return results


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work, so wall-clock timings are complete (no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


class Stopwatch:
    """Accumulated wall seconds of inference (``with watch: ...``), CUDA-synchronised at both ends."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
