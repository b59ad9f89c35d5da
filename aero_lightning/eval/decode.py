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

Loops. A repetition guard (:mod:`aero_lightning.eval.repetition_guard`, ``GenerationOptions.repetition_guard``) stops
a sample whose newest tokens repeat one token n-gram back to back; its result is flagged
(``DecodeResult.stopped_by_repetition_guard``) and is not counted as a budget hit.

Long recordings. A recording longer than one pass can hold (:func:`pass_limit_samples`: the LLM's context, capped by
``max_pass_s``) is decoded in overlapping chunks, one chunk per ``generate`` call, and the chunk texts are merged
(:mod:`aero_lightning.eval.chunking`: transformers' ASR-pipeline chunking and merge rule, on words).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT, encode_chat
from aero_lightning.data.datamodule import AsrCollator
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.packing import float_windows
from aero_lightning.eval.chunking import max_pass_samples, merge_chunk_texts, plan_chunks
from aero_lightning.eval.repetition_guard import RepetitionGuard, repetition_guard_from
from aero_lightning.progress import Progress

logger = logging.getLogger(__name__)

__all__ = [
    "DecodeResult",
    "GenerationOptions",
    "chars_per_token",
    "decode_waveforms",
    "pass_limit_samples",
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
        repetition_guard: stop a sample whose newest tokens loop (:class:`RepetitionGuard`); a mapping of its
            fields with ``enabled``, True for the defaults, None or False for no guard.
        max_pass_s: longest recording decoded in one pass, in seconds, further limited by the LLM's context
            (:func:`pass_limit_samples`); None: the context alone. Default 900 s, Aero-1-Audio's single pass.
        chunk_s: chunk length in seconds; recordings longer than it are chunked. None: chunk only recordings over
            the pass limit, at that limit.
        stride_s: overlap on each side of a chunk in seconds (transformers' ``stride_length_s``); consecutive
            chunks share ``2 x stride_s``.

    Raises:
        ValueError: for out-of-range settings, or ``chunk_s <= 2 x stride_s``.
    """

    num_beams: int = 1
    max_new_tokens: int | None = None
    base_new_tokens: int = 16
    chars_per_second: float = 25.0
    max_new_tokens_cap: int = 8192
    repetition_guard: RepetitionGuard | Mapping | bool | None = field(default_factory=RepetitionGuard)
    max_pass_s: float | None = 900.0
    chunk_s: float | None = None
    stride_s: float = 5.0

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")
        if self.chars_per_second <= 0 or self.max_new_tokens_cap < 1 or self.base_new_tokens < 0:
            raise ValueError("chars_per_second and max_new_tokens_cap must be positive, base_new_tokens >= 0")
        if self.max_pass_s is not None and self.max_pass_s <= 0:
            raise ValueError(f"max_pass_s must be positive or null, got {self.max_pass_s}")
        if self.stride_s < 0:
            raise ValueError(f"stride_s must be >= 0, got {self.stride_s}")
        if self.chunk_s is not None and self.chunk_s <= 2 * self.stride_s:
            raise ValueError(f"chunk_s ({self.chunk_s}) must be longer than 2 x stride_s ({self.stride_s})")
        # a frozen dataclass: the normalised guard replaces the config value in place
        object.__setattr__(self, "repetition_guard", repetition_guard_from(self.repetition_guard))

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
        budget: the sample's ``max_new_tokens`` (chunked: the sum over its chunks).
        finished: an end-of-turn / eos token was generated within the budget (chunked: in every chunk). False:
            cut at the budget, or stopped by the repetition guard.
        stopped_by_repetition_guard: the repetition guard stopped it (chunked: in at least one chunk).
        num_chunks: chunks it was decoded in (1: one pass).
    """

    text: str
    num_new_tokens: int
    budget: int
    finished: bool
    stopped_by_repetition_guard: bool = False
    num_chunks: int = 1

    @property
    def budget_hit(self) -> bool:
        """Cut at its token budget: neither an end-of-turn token nor the repetition guard ended it."""
        return not self.finished and not self.stopped_by_repetition_guard


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


def pass_limit_samples(
    model, prompt: str, options: GenerationOptions, tokenizer_chars_per_token: float
) -> int | None:
    """The longest recording one ``generate`` call holds with ``prompt``, in 16 kHz samples.

    Its audio slots, the prompt and its duration-scaled budget must fit the LLM's context
    (``llm.config.max_position_embeddings``), and it is at most ``options.max_pass_s``
    (:func:`aero_lightning.eval.chunking.max_pass_samples`). With the demo model (4096 positions, 12.5 audio tokens
    and ~15 budget tokens per second) that is about 150 s; with Aero's shape (32 768 positions, 25 audio tokens and
    ~6 budget tokens per second) the 900 s cap.

    Args:
        model: an :class:`~aero_lightning.model.aero.AeroModel`.
        prompt: the instruction after the audio.
        options: generation settings (budget, ``max_pass_s``).
        tokenizer_chars_per_token: :func:`chars_per_token` of the model's tokenizer.

    Returns:
        Samples, or None when neither the context nor ``max_pass_s`` bounds a pass.

    Raises:
        ValueError: if the context cannot hold the prompt and any audio.
    """
    enc = encode_chat(
        model.tokenizer, user_messages(prompt), [1], model.end_of_turn_token, add_generation_prompt=True
    )
    cap = round(options.max_pass_s * SAMPLE_RATE_HZ) if options.max_pass_s is not None else None
    return max_pass_samples(
        getattr(model.llm.config, "max_position_embeddings", None),
        len(enc.input_ids) - 1,
        model.audio_token_counter(),
        lambda n: options.budget(n / SAMPLE_RATE_HZ, tokenizer_chars_per_token),
        cap,
    )


class _StepProgress(StoppingCriteria):
    """Counts generation steps into a :class:`~aero_lightning.progress.Progress`; never stops anything."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        self.progress.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _is_clip_list(waveform) -> bool:
    return isinstance(waveform, (list, tuple)) and all(isinstance(c, np.ndarray) for c in waveform)


def _clips(waveform) -> list[np.ndarray]:
    """The clips of one input: a waveform, or a list of clips (a conversation with several)."""
    if _is_clip_list(waveform):
        return [np.asarray(c, dtype=np.float32) for c in waveform]
    return [np.asarray(waveform, dtype=np.float32)]


def _num_samples(waveform) -> int:
    return sum(len(c) for c in _clips(waveform))


def _decode_pass(
    model,
    waveforms: Sequence,
    prompts: Sequence,
    options: GenerationOptions,
    cpt: float,
    synced_gpus: bool,
    progress: Progress | None,
) -> list[DecodeResult]:
    """One ``generate`` call over ``waveforms`` (each in one LLM context); see :func:`decode_waveforms`."""
    tok = model.tokenizer
    samples = [
        {
            "key": str(i),
            "waveforms": _clips(w),
            "messages": user_messages(p) if isinstance(p, str) else list(p),
        }
        for i, (w, p) in enumerate(zip(waveforms, prompts))
    ]
    collate = AsrCollator(
        tok, model.audio_token_counter(), for_generation=True, end_of_turn_token=model.end_of_turn_token
    )
    batch = collate(samples)
    device, dtype = _model_device_dtype(model)
    # the files' float audio at full precision (training batches carry 16-bit PCM, which is what the shards hold)
    windows, window_lengths = float_windows(
        [c for s in samples for c in s["waveforms"]], model.audio_token_counter()
    )
    features, feature_lengths = model.compute_features(
        windows.to(device), window_lengths.to(device)
    )  # (W, n_mels, T), (W,)
    budgets = [options.budget(_num_samples(w) / SAMPLE_RATE_HZ, cpt) for w in waveforms]
    criteria = StoppingCriteriaList()
    guard = options.repetition_guard
    if guard is not None:
        criteria.append(guard.criterion(options.num_beams))
    steps = _StepProgress(progress) if progress is not None else None
    if steps is not None:
        criteria.append(steps)
    generated = model.generate(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        features.to(dtype),
        feature_lengths,
        max_new_tokens=max(budgets),
        num_beams=options.num_beams,
        synced_gpus=synced_gpus,
        stopping_criteria=criteria,
    )  # (B, T_new)
    if steps is not None:  # the pass is done: count the steps an early stop left unused
        progress.update(max(0, max(budgets) - steps.steps))
    stops = {i for i in (model.end_of_turn_id, tok.eos_token_id) if i is not None}
    results = []
    for row, budget in zip(generated.tolist(), budgets):
        row = row[:budget]
        end = next((j for j, t in enumerate(row) if t in stops), None)
        # the guard ends a row before any stop token; the pad after it may itself be a stop token (eos)
        loop_end = guard.find_stop(row[:end] if end is not None else row) if guard is not None else None
        if loop_end is not None:
            kept, finished = row[:loop_end], False
        else:
            kept, finished = (row if end is None else row[: end + 1]), end is not None
        text = tok.decode(kept, skip_special_tokens=True).strip()
        results.append(DecodeResult(text, len(kept), budget, finished, loop_end is not None))
    return results


@torch.no_grad()
def decode_waveforms(
    model,
    waveforms: Sequence,
    prompts: str | Sequence = DEFAULT_ASR_PROMPT,
    options: GenerationOptions | None = None,
    tokenizer_chars_per_token: float | None = None,
    synced_gpus: bool = False,
    progress_desc: str | None = None,
) -> list[DecodeResult]:
    """Decode one batch of 16 kHz mono waveforms.

    Waveforms that one pass holds go through one ``generate`` call together; a longer one (module docstring) is
    cut into overlapping chunks (:func:`aero_lightning.eval.chunking.plan_chunks`, ``options.chunk_s`` /
    ``stride_s``), each chunk decoded in its own call, and the chunk texts merged
    (:func:`aero_lightning.eval.chunking.merge_chunk_texts`).

    Args:
        model: an :class:`~aero_lightning.model.aero.AeroModel` (eval mode is the caller's choice).
        waveforms: ``(T_i,)`` float32 arrays at 16 kHz; up to the pass limit in one LLM context, longer ones in
            chunks. An entry may instead be a list of clips, for a prompt (chat messages) with several audio parts.
        prompts: the instruction after the audio, one for all or one per waveform; an entry may instead be a
            conversation's chat messages (the sample's own question or instruction, every audio part, earlier
            turns; :func:`aero_lightning.data.chat.prompt_messages` of a prepared sample), decoded in one pass
            and never chunked.
        options: :class:`GenerationOptions` (defaults: greedy, scaled budget, repetition guard, 900 s passes).
        tokenizer_chars_per_token: cached :func:`chars_per_token` of the model's tokenizer (computed when None).
        synced_gpus: keep generating until every rank is done (needed when parameters are sharded across ranks,
            whose every forward is a collective). Nothing is chunked then, since ranks must make the same number
            of ``generate`` calls; an over-long waveform is decoded in one pass with a warning.
        progress_desc: show the progress of this call in generation steps (tokens) under this name
            (:class:`~aero_lightning.progress.Progress`: a bar on a terminal, a log line every 30 s otherwise);
            the total is the budget of every pass. None: no progress.

    Returns:
        One :class:`DecodeResult` per waveform, in order.

    Raises:
        ValueError: on an empty waveform, a prompt count that does not match, or ``options.chunk_s`` longer than
            a pass holds.
    """
    options = options or GenerationOptions()
    if isinstance(prompts, str):
        prompts = [prompts] * len(waveforms)
    if len(prompts) != len(waveforms):
        raise ValueError(f"{len(prompts)} prompts for {len(waveforms)} waveforms")
    if not waveforms:
        return []
    for i, w in enumerate(waveforms):
        if _num_samples(w) == 0:
            raise ValueError(f"waveform {i} is empty")
    cpt = tokenizer_chars_per_token or chars_per_token(model.tokenizer)
    limits: dict[str, int | None] = {}  # prompt -> pass limit in samples
    plans: list[list[tuple[int, int]] | None] = []  # chunks of each waveform; None: one pass
    for w, prompt in zip(waveforms, prompts):
        if not isinstance(prompt, str) or _is_clip_list(w):
            plans.append(None)  # a conversation's own messages: one pass, as it was trained
            continue
        if prompt not in limits:
            limits[prompt] = pass_limit_samples(model, prompt, options, cpt)
        limit = limits[prompt]
        chunk = limit
        if options.chunk_s is not None:
            chunk = round(options.chunk_s * SAMPLE_RATE_HZ)
            if limit is not None and chunk > limit:
                raise ValueError(
                    f"chunk_s={options.chunk_s} s is longer than one pass holds ({limit / SAMPLE_RATE_HZ:.1f} s "
                    "with this model's context, max_pass_s and token budget)"
                )
        if chunk is None or len(w) <= chunk:
            plans.append(None)
        elif synced_gpus:
            logger.warning(
                "a %.1f s recording is longer than one pass holds (%.1f s) but is decoded in one pass: chunking "
                "is off with synced_gpus (the ranks must make the same generate calls)",
                len(w) / SAMPLE_RATE_HZ,
                chunk / SAMPLE_RATE_HZ,
            )
            plans.append(None)
        else:
            plans.append(plan_chunks(len(w), chunk, round(options.stride_s * SAMPLE_RATE_HZ)))
    whole = [i for i, plan in enumerate(plans) if plan is None]
    bar = None
    if progress_desc is not None:
        total = max(
            (options.budget(_num_samples(waveforms[i]) / SAMPLE_RATE_HZ, cpt) for i in whole), default=0
        )
        total += sum(
            options.budget((end - start) / SAMPLE_RATE_HZ, cpt)
            for plan in plans
            if plan is not None
            for start, end in plan
        )
        bar = Progress(total, progress_desc, unit="token")
    results: list[DecodeResult | None] = [None] * len(waveforms)
    try:
        if whole:
            decoded = _decode_pass(
                model,
                [waveforms[i] for i in whole],
                [prompts[i] for i in whole],
                options,
                cpt,
                synced_gpus,
                bar,
            )
            for i, res in zip(whole, decoded):
                results[i] = res
        for i, plan in enumerate(plans):
            if plan is None:
                continue
            parts = []
            for c, (start, end) in enumerate(plan):
                if bar is not None:
                    bar.update(0, postfix=f"chunk {c + 1}/{len(plan)}")
                parts += _decode_pass(
                    model, [waveforms[i][start:end]], [prompts[i]], options, cpt, synced_gpus, bar
                )
            results[i] = DecodeResult(
                text=merge_chunk_texts([p.text for p in parts]),
                num_new_tokens=sum(p.num_new_tokens for p in parts),
                budget=sum(p.budget for p in parts),
                finished=all(p.finished for p in parts),
                stopped_by_repetition_guard=any(p.stopped_by_repetition_guard for p in parts),
                num_chunks=len(plan),
            )
    finally:
        if bar is not None:
            bar.close()
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
