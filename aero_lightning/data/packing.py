"""Token-budget batching and padding-free packing.

Every sample's LLM cost is known before its audio is decoded: ``audio tokens + text tokens``, where the audio
tokens are a pure function of the duration stored in the sample's JSON (:class:`~aero_lightning.data.audio_tokens.AudioTokenCounter`) and the
text tokens come from rendering the chat template. A micro-batch is budgeted in LLM tokens
(``packing_length``):

- ``packed``: documents are concatenated into one row, ``sum(costs) <= packing_length``; planned with greedy
  first-fit-decreasing (FFD, Johnson 1973; at most 11/9 OPT + 6/9 bins, Dósa 2007) within a buffer.
- ``padded``: documents are padded to the longest in the batch, ``len(batch) * max(costs) <= packing_length``;
  planned by sorting the buffer by cost so that similar lengths share a batch.

Samples whose cost exceeds ``packing_length`` are never truncated: the planners raise, and the stream skips and
counts them before planning.

The packed batch contract (all CPU tensors, no L x L mask anywhere)::

    input_ids     (1, L) int64   documents back to back, L = sum of document lengths (no padding)
    labels        (1, L) int64   unshifted targets, -100 outside assistant replies and at every document's
                                 first position, so the model's one-token shift never crosses a boundary
    position_ids  (1, L) int64   0..len_d-1 restarting in every document
    cu_seqlens    (D+1,) int32   cumulative document lengths, cu_seqlens[0] = 0, cu_seqlens[-1] = L
    max_seqlen    int            longest document
    audio_pcm     (S,)   int16   16-bit PCM of all 30 s windows of all documents in order, back to back
                                 (S = sum of window_lengths): half the bytes of float32 and no padding, and no
                                 precision plugin casts an integer tensor (DeepSpeed's bf16 would round floats)
    window_lengths (W,)  int64   samples per window
    encoder_cu_seqlens (W+1,) int32  cumulative encoder frames per window (the encoder's own documents)

    With cached encoder outputs (samples carrying ``encoder_states``, :mod:`aero_lightning.data.encoder_cache`),
    ``audio_pcm`` is replaced by
    encoder_states (N, D_enc)  float16 | bfloat16 | float32  the cached frames of every window, back to back
                                 (N = sum of encoder_frame_lengths), in slot order
    encoder_frame_lengths (W,) int64  frames per window; window_lengths are the windows of the decoded clips
    audio_samples (D,)   int64   samples of audio per document (all its clips; 0 for a text-only document)
    keys, references, corpora, tasks   lists of D strings
    duplicates                   list of D bools: repeats that pad a rank's evaluation pass (not scored)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from aero_lightning.data.chat import IGNORE_INDEX, reference_text

PACKING_MODES = ("padded", "packed")


def _check_costs(costs: Sequence[int], capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"packing_length must be >= 1 token, got {capacity}")
    over = [c for c in costs if c > capacity]
    if over:
        raise ValueError(
            f"{len(over)} sample(s) cost more than packing_length={capacity} tokens (largest {max(over)}); "
            "skip them before planning or raise data.packing.packing_length"
        )
    if any(c < 1 for c in costs):
        raise ValueError("every sample must cost at least 1 token")


def plan_packed(costs: Sequence[int], capacity: int) -> list[list[int]]:
    """Group samples into packs of at most ``capacity`` tokens with first-fit-decreasing.

    Args:
        costs: tokens per sample (audio + text).
        capacity: ``packing_length``, tokens per pack.

    Returns:
        Lists of sample indices, one per pack; each pack's costs sum to at most ``capacity``. Within a pack the
        indices are in decreasing cost order; packs are in creation order (fullest first, roughly).

    Raises:
        ValueError: if a cost exceeds ``capacity`` or is < 1.
    """
    _check_costs(costs, capacity)
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        c = costs[i]
        for b, room in enumerate(free):
            if c <= room:
                bins[b].append(i)
                free[b] = room - c
                break
        else:
            bins.append([i])
            free.append(capacity - c)
    return bins


def plan_padded(costs: Sequence[int], capacity: int, sort: bool = True) -> list[list[int]]:
    """Group samples into padded batches with ``len(batch) * max(cost) <= capacity``.

    Args:
        costs: tokens per sample.
        capacity: token budget per padded batch (batch size x padded length).
        sort: sort by decreasing cost first, so each batch holds samples of similar length (the stream's
            ``padded`` mode); False cuts batches in arrival order (the naive padded baseline of the benchmarks).

    Returns:
        Lists of sample indices, one per batch.

    Raises:
        ValueError: if a cost exceeds ``capacity`` or is < 1.
    """
    _check_costs(costs, capacity)
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i)) if sort else range(len(costs))
    batches: list[list[int]] = []
    longest = 0
    for i in order:
        if batches and (len(batches[-1]) + 1) * max(longest, costs[i]) <= capacity:
            batches[-1].append(i)
            longest = max(longest, costs[i])
        else:
            batches.append([i])
            longest = costs[i]
    return batches


def plan_batches(costs: Sequence[int], capacity: int, mode: str) -> list[list[int]]:
    """Dispatch to :func:`plan_packed` or :func:`plan_padded`.

    Raises:
        ValueError: for an unknown ``mode`` (must be ``padded`` or ``packed``) or an over-budget cost.
    """
    if mode == "packed":
        return plan_packed(costs, capacity)
    if mode == "padded":
        return plan_padded(costs, capacity)
    raise ValueError(f"data.packing.mode must be one of {PACKING_MODES}, got {mode!r}")


def plan_stats(costs: Sequence[int], batches: Sequence[Sequence[int]], mode: str, capacity: int) -> dict:
    """Token accounting of a plan.

    Args:
        costs: tokens per sample.
        batches: the plan (lists of sample indices).
        mode: ``padded`` or ``packed``.
        capacity: ``packing_length`` in tokens.

    Returns:
        ``real_tokens`` (sum of costs), ``computed_tokens`` (what the LLM processes: ``len(b) * max`` per padded
        batch, the real tokens for a pack), ``budget_tokens`` (``len(batches) * capacity``), ``real_fraction``
        (real / computed) and ``fill_ratio`` (real / budget: how much of each micro-batch's token budget is real
        data).
    """
    real = sum(costs[i] for b in batches for i in b)
    if mode == "packed":
        computed = real
    else:
        computed = sum(len(b) * max(costs[i] for i in b) for b in batches)
    budget = len(batches) * capacity
    return {
        "real_tokens": real,
        "computed_tokens": computed,
        "budget_tokens": budget,
        "real_fraction": real / computed if computed else 0.0,
        "fill_ratio": real / budget if budget else 0.0,
    }


# --------------------------------------------------------------------------------------------- collate


PCM_SCALE = 32768
"""16-bit PCM full scale: ``float = int16 / 32768``, libsndfile's convention (a PCM_16 FLAC read as float32 is
exactly ``int16 / 32768``)."""


def to_pcm16(waveform: np.ndarray) -> np.ndarray:
    """``(T,)`` waveform as 16-bit PCM: int16 unchanged; floats in [-1, 1] as ``round(x * 32768)``, clipped.

    Lossless for audio read from our 16-bit FLAC shards (their floats are multiples of ``1 / 32768``).
    """
    wave = np.asarray(waveform)
    if wave.dtype == np.int16:
        return wave
    return np.clip(np.rint(wave.astype(np.float64) * PCM_SCALE), -PCM_SCALE, PCM_SCALE - 1).astype(np.int16)


def sample_clips(sample: dict) -> list[np.ndarray]:
    """A sample's audio clips in order: its ``waveforms``, or ``[waveform]``, or ``[]`` for a text-only sample."""
    if "waveforms" in sample:
        return list(sample["waveforms"])
    return [sample["waveform"]] if sample.get("waveform") is not None else []


def _windows(samples: Sequence[dict], counter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S,)`` int16 PCM of every window of every clip of every sample, back to back, and ``(W,)`` samples per
    window (both empty for text-only batches)."""
    clips = [clip for s in samples for clip in sample_clips(s)]
    lengths = [w for clip in clips for w in counter.window_lengths(int(clip.shape[0]))]
    if not clips:
        return torch.zeros(0, dtype=torch.int16), torch.zeros(0, dtype=torch.long)
    pcm = np.concatenate([to_pcm16(c) for c in clips])  # each clip's windows are consecutive slices
    return torch.from_numpy(pcm), torch.tensor(lengths, dtype=torch.long)


def float_windows(waveforms: Sequence[np.ndarray], counter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, N)`` float32 windows of float waveforms, zero-padded to the longest, and ``(W,)`` samples per window.

    For inference on arbitrary float audio (transcription, evaluation, the HF pipeline), which is read at full
    precision rather than as 16-bit PCM; training batches carry ``audio_pcm`` instead.
    """
    pieces = []
    for wave in waveforms:
        start = 0
        for length in counter.window_lengths(int(wave.shape[0])):
            pieces.append(
                torch.from_numpy(np.ascontiguousarray(wave[start : start + length], dtype=np.float32))
            )
            start += length
    lengths = torch.tensor([len(w) for w in pieces], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True), lengths  # (W, N), (W,)


def _cached_windows(samples: Sequence[dict], counter) -> dict[str, torch.Tensor]:
    """Cached encoder frames of every clip of every sample, back to back, with their windows' lengths.

    Raises:
        ValueError: if a sample of the batch holds waveforms, or a clip's frames are not the encoder frames of its
            windows.
    """
    if any(sample_clips(s) for s in samples):
        raise ValueError("a batch mixes cached encoder states and waveforms")
    states, windows, frames = [], [], []
    for s in samples:
        for clip_states, num_samples in zip(s.get("encoder_states", []), s.get("clip_samples", [])):
            lengths = counter.window_lengths(int(num_samples))
            clip_frames = [int(counter.encoder_frames(w)) for w in lengths]
            if sum(clip_frames) != clip_states.shape[0]:
                raise ValueError(
                    f"sample {s['key']}: {clip_states.shape[0]} cached frames for a clip of {num_samples} samples, "
                    f"whose windows have {sum(clip_frames)}"
                )
            states.append(torch.as_tensor(clip_states))
            windows += lengths
            frames += clip_frames
    return {
        "encoder_states": torch.cat(states),  # (N, D_enc): every window's valid frames, in slot order
        "encoder_frame_lengths": torch.tensor(frames, dtype=torch.long),  # (W,)
        "window_lengths": torch.tensor(windows, dtype=torch.long),  # (W,)
    }


def _clip_lengths(sample: dict) -> list[int]:
    """Samples of each audio clip of a sample (its waveforms', or, for cached frames, the decoded lengths)."""
    if sample.get("encoder_states"):
        return [int(n) for n in sample["clip_samples"]]
    return [int(c.shape[0]) for c in sample_clips(sample)]


def _common(samples: Sequence[dict], counter) -> dict[str, Any]:
    if any(s.get("encoder_states") for s in samples):  # frames from an encoder cache instead of audio
        audio = _cached_windows(samples, counter)
    else:
        audio_pcm, window_lengths = _windows(samples, counter)
        audio = {"audio_pcm": audio_pcm, "window_lengths": window_lengths}
    return audio | {
        "audio_samples": torch.tensor([sum(_clip_lengths(s)) for s in samples], dtype=torch.long),
        "tasks": [s.get("task", "asr") for s in samples],
        "keys": [s["key"] for s in samples],
        "references": [reference_text(s["messages"]) for s in samples],
        "corpora": [s.get("corpus", "") for s in samples],
        "duplicates": [bool(s.get("duplicate", False)) for s in samples],
    }


def collate_padded(samples: Sequence[dict], counter, pad_id: int, left_pad: bool = False) -> dict[str, Any]:
    """Padded batch of pre-tokenised samples.

    Args:
        samples: dicts with ``input_ids`` and ``labels`` (lists of ints, equal length), the audio clips
            (``waveforms``: a list of ``(T,)`` arrays at 16 kHz, or one ``waveform``; none for text only), ``key``,
            ``messages`` and optionally ``corpus`` and ``task``. In place of waveforms a sample may carry cached
            encoder frames: ``encoder_states`` (per clip a ``(F_i, D_enc)`` tensor) and ``clip_samples`` (each
            clip's decoded length in samples); a batch holds one kind or the other.
        counter: :class:`~aero_lightning.data.audio_tokens.AudioTokenCounter` of the model (30 s window split).
        pad_id: token id used for padding.
        left_pad: pad on the left (generation prompts) instead of the right.

    Returns:
        ``input_ids (B, L)``, ``attention_mask (B, L)``, ``labels (B, L)`` (-100 on padding) plus the audio and
        bookkeeping fields of the module docstring.
    """
    batch_size = len(samples)
    max_len = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        sl = slice(max_len - n, max_len) if left_pad else slice(0, n)
        input_ids[i, sl] = torch.tensor(s["input_ids"])
        labels[i, sl] = torch.tensor(s["labels"])
        attention_mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels} | _common(
        samples, counter
    )


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def collate_packed(samples: Sequence[dict], counter) -> dict[str, Any]:
    """One padding-free row of documents, following the packed batch contract of the module docstring.

    Args:
        samples: as for :func:`collate_padded`.
        counter: the model's :class:`~aero_lightning.data.audio_tokens.AudioTokenCounter`.

    Returns:
        The packed batch dict (``attention_mask`` is absent: attention is per document).
    """
    input_ids = torch.cat([torch.tensor(s["input_ids"], dtype=torch.long) for s in samples])  # (L,)
    labels = []
    for s in samples:
        lab = torch.tensor(s["labels"], dtype=torch.long)
        lab[0] = IGNORE_INDEX  # the shift must never predict a document's first token from the previous one
        labels.append(lab)
    lengths = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long)  # (D,)
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])  # (L,)
    common = _common(samples, counter)
    return {
        "input_ids": input_ids[None],  # (1, L)
        "labels": torch.cat(labels)[None],  # (1, L)
        "position_ids": position_ids[None],  # (1, L)
        "cu_seqlens": _cu(lengths),  # (D+1,)
        "max_seqlen": int(lengths.max()),
        "encoder_cu_seqlens": _cu(counter.encoder_frames(common["window_lengths"])),  # (W+1,)
    } | common


def batch_documents(
    input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, labels)`` of each document of a batch: the rows of a padded ``(B, L)`` batch, or the
    ``cu_seqlens`` segments of a packed ``(1, L)`` row (padding stays in a padded row)."""
    if cu_seqlens is None:
        return list(zip(input_ids, labels))
    bounds = cu_seqlens.tolist()
    return [(input_ids[0, a:b], labels[0, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def target_documents(batch: dict) -> torch.Tensor:
    """The document of every LM target of a batch: ``(N_t,)`` int64 indices into the batch's documents, in the
    row-major order of ``labels[:, 1:] != -100`` (the targets the loss sums over)."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, L-1)
    cu = batch.get("cu_seqlens")
    if cu is None:  # padded: one document per row
        return mask.nonzero()[:, 0]
    positions = mask[0].nonzero()[:, 0] + 1  # the label's own position in the packed row
    return torch.searchsorted(cu[1:].to(positions.device, torch.long), positions, right=True)


def make_collate(mode: str, counter, pad_id: int) -> Callable[[Sequence[dict]], dict[str, Any]]:
    """The collate function of a packing mode (``padded`` right-pads, ``packed`` concatenates).

    Raises:
        ValueError: for an unknown mode.
    """
    if mode == "packed":
        return lambda samples: collate_packed(samples, counter)
    if mode == "padded":
        return lambda samples: collate_padded(samples, counter, pad_id)
    raise ValueError(f"data.packing.mode must be one of {PACKING_MODES}, got {mode!r}")
