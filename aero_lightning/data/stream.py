"""Multi-corpus training stream: weighted mixture, token-budget batches, exact resume.

Each DataLoader worker of each rank runs one :class:`TrainStream` iterator, identified by a *logical id*
(``rank * num_workers + worker``). Its data is a deterministic function of ``(seed, logical id)``:

1. Every corpus is an infinite, resampled sequence of shards (:class:`CorpusStream`): each shard is drawn with a
   seeded generator from the reader's share of the corpus (:func:`plan_shards`) and read front to back with
   :func:`~aero_lightning.data.shard_reader.iter_tar`. Infinite streams with step-based training mean no rank can
   run dry (finite per-rank shard lists hang DDP: webdataset issues 188 and 225).

   The share gives every shard of a corpus the same expected read rate, whatever the number of shards ``n`` and of
   readers ``R`` (ranks x workers). The ``n`` shards lie on a circle of length ``n``, shard ``k`` on ``[k, k+1)``;
   reader ``r`` owns the arc ``[r n / R, (r+1) n / R)`` and draws shard ``k`` with probability (overlap of shard
   ``k`` with its arc) / (arc length ``n / R``). The arcs tile the circle, so the overlaps of one shard sum to 1
   over the readers and, readers reading at equal rates, every shard is drawn at ``R / n`` times a reader's rate.
   A strided split (``urls[r::R]``) cannot do that when ``R`` does not divide ``n``: at 16 GPUs x 8 workers over
   200 shards, 72 readers would own 2 shards and 56 readers 1, so those 56 shards would be read twice as often as
   the other 144. With ``n < R`` each shard is shared by about ``R / n`` readers, which differ by their seeds.
2. :class:`MixtureStream` picks the corpus of every sample with probabilities ``p_i ∝ w_i^(1/T)``.
3. Samples are read in *blocks* of ``buffer_size``. For each sample only the JSON is parsed at this point: the
   chat is tokenised and its LLM cost (audio tokens from ``duration_s`` + text tokens) is known before any audio is
   decoded. Over-budget and malformed samples are skipped and counted. The JSON checks and the audio decoding are
   those of every shard reader (:mod:`aero_lightning.data.shard_reader`).
4. The block is planned into micro-batches (:mod:`aero_lightning.data.packing`), the batches are shuffled, and
   each batch's audio is decoded just before it is emitted.

Every emitted batch carries ``data_state``: where the block began (generator states, shard and offset per
corpus), how many of its batches have been emitted, and the reject counts. Restoring a state re-reads only that
block's samples (JSON + bytes, no audio decoding), re-plans it identically and skips the emitted batches, so a
resumed run continues with exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from aero_lightning.data.chat import encode_chat
from aero_lightning.data.encoder_cache import EncoderCacheReader
from aero_lightning.data.packing import PACKING_MODES, make_collate, plan_batches
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import (
    decode_clips,
    dist_rank_world,
    iter_tar,
    parse_sample,
    sample_label,
)

logger = logging.getLogger(__name__)

JOB_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals SLURM sends to every process of a job step before ending it; meant for the trainer only."""


def ignore_job_signals() -> None:
    """Make this DataLoader worker ignore :data:`JOB_SIGNALS`.

    SLURM signals the workers too. The trainer acts on the signal at the next step boundary
    (:mod:`aero_lightning.callbacks.preemption`) and needs its workers until then, but torch gives every worker a
    SIGTERM handler (``_set_worker_signal_handlers``, run at the start of ``_worker_loop``, after fork) that
    re-raises any SIGTERM not sent by the parent, and SIGUSR1's default action ends the process: the worker would
    die and the trainer fail with "DataLoader worker ... is killed by signal" in the middle of the preemption step.
    Runs in the worker, after torch's set-up. Workers still stop when the trainer shuts them down (the DataLoader
    sends them a stop message) or exits (their watchdog sees the parent gone).
    """
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def shard_weights(num_shards: int, reader: int, num_readers: int) -> dict[int, int]:
    """Integer draw weights of reader ``reader``'s arc of the shard circle (module docstring, item 1).

    Scaled by ``num_readers`` so that everything is an integer: shard ``k`` covers ``[k R, (k+1) R)`` and reader
    ``r`` the arc ``[r n, (r+1) n)`` of a circle of length ``n R`` (``n`` shards, ``R`` readers). The weight of
    shard ``k`` is the length of their overlap, so a reader's weights sum to ``n`` and one shard's weights sum to
    ``R`` over all readers.

    Args:
        num_shards: shards in the corpus, ``n >= 1``.
        reader: logical reader id, ``0 <= reader < num_readers`` (``rank * num_workers + worker``).
        num_readers: ``R >= 1`` (world size x DataLoader workers).

    Returns:
        ``{shard index: weight > 0}`` in increasing shard order.

    Raises:
        ValueError: on ``num_shards < 1``, ``num_readers < 1`` or ``reader`` out of range.
    """
    if num_shards < 1 or num_readers < 1:
        raise ValueError(f"need >= 1 shard and >= 1 reader, got {num_shards} shards, {num_readers} readers")
    if not 0 <= reader < num_readers:
        raise ValueError(f"reader {reader} out of range for {num_readers} readers")
    lo, hi = reader * num_shards, (reader + 1) * num_shards
    weights = {}
    for k in range(lo // num_readers, -(-hi // num_readers)):
        overlap = min((k + 1) * num_readers, hi) - max(k * num_readers, lo)
        if overlap > 0:
            weights[k] = overlap
    return weights


def plan_shards(urls: Sequence[str], reader: int, num_readers: int) -> tuple[list[str], list[int] | None]:
    """The shards reader ``reader`` of ``num_readers`` draws from, and their weights (:func:`shard_weights`).

    Args:
        urls: the corpus's shard paths (in the same order on every reader).
        reader: logical reader id.
        num_readers: ranks x DataLoader workers.

    Returns:
        ``(shards, weights)``; ``weights`` is None when they are all equal, and the reader then draws uniformly
        with ``rng.integers(len(shards))`` (for one reader: every shard, the draw a single process always made).

    Raises:
        ValueError: as :func:`shard_weights`.
    """
    weights = shard_weights(len(urls), reader, num_readers)
    shards = [urls[k] for k in weights]
    values = list(weights.values())
    return shards, (None if len(set(values)) == 1 else values)


class CorpusStream:
    """Infinite resampled sequence of one corpus's raw samples.

    Args:
        name: corpus name.
        urls: shard paths.
        seed: seeds the shard draws.
        rejects: shared reject counter.
        weights: positive integer draw weight of each shard (:func:`plan_shards`), or None to draw uniformly.

    Raises:
        ValueError: if ``urls`` is empty, or ``weights`` does not give one positive weight per shard.
        RuntimeError: from :meth:`next` if ``2 * len(urls) + 8`` consecutive shard draws yield no sample (every
            shard unreadable).
    """

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        seed: Sequence[int],
        rejects: RejectCounter,
        weights: Sequence[int] | None = None,
    ):
        if not urls:
            raise ValueError(f"corpus {name!r} has no shards")
        if weights is not None and (len(weights) != len(urls) or min(weights) < 1):
            raise ValueError(f"corpus {name!r}: need one weight >= 1 per shard, got {list(weights)}")
        self.name = name
        self.urls = list(urls)
        self.rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
        self.rejects = rejects
        self._cum = None if weights is None else np.cumsum(np.asarray(weights, dtype=np.int64))
        self.url: str | None = None
        self.offset = 0
        self._it: Iterator[dict] | None = None

    def draw(self) -> int:
        """Index into ``urls`` of the next shard: uniform, or by weight (an exact integer draw)."""
        if self._cum is None:
            return int(self.rng.integers(len(self.urls)))
        return int(np.searchsorted(self._cum, self.rng.integers(self._cum[-1]), side="right"))

    def state(self) -> dict:
        """Generator state after the current shard's draw, the shard, and samples consumed from it."""
        return {"rng": self.rng.bit_generator.state, "url": self.url, "offset": self.offset}

    def load_state(self, state: Mapping) -> None:
        """Continue exactly after the ``offset``-th sample of shard ``url`` (re-reads that shard's prefix)."""
        self.rng.bit_generator.state = state["rng"]
        self.url, self.offset, self._it = state["url"], 0, None
        if self.url is not None:
            # the prefix was read without error before the state was taken, so any error this iterator meets
            # lies after it and has not been counted yet
            self._it = iter_tar(self.url, self.rejects)
            for _ in range(state["offset"]):
                if next(self._it, None) is None:
                    break
                self.offset += 1

    def next(self) -> dict:
        """The next raw sample (tar members as bytes, plus ``__key__``, ``__url__`` and ``__corpus__``)."""
        empty = 0
        while True:
            if self._it is None:
                self.url = self.urls[self.draw()]
                self.offset = 0
                self._it = iter_tar(self.url, self.rejects)
            raw = next(self._it, None)
            if raw is not None:
                self.offset += 1
                raw["__corpus__"] = self.name
                return raw
            if self.offset == 0:
                empty += 1
                if empty > 2 * len(self.urls) + 8:
                    raise RuntimeError(f"corpus {self.name!r}: {empty} shard draws in a row gave no sample")
            self._it = None


def mixture_probs(weights: Mapping[str, float], temperature: float = 1.0) -> dict[str, float]:
    """Sampling probability of each corpus, ``p_i = w_i^(1/T) / sum_j w_j^(1/T)``.

    Temperature sampling as in Arivazhagan et al. 2019, "Massively Multilingual Neural Machine Translation in the
    Wild" (arXiv:1907.05019, §4.2): ``T = 1`` follows the weights (e.g. hours), larger ``T`` flattens towards
    uniform.

    Args:
        weights: ``{corpus: weight}``, weights > 0 (e.g. hours of audio).
        temperature: ``T > 0``.

    Returns:
        ``{corpus: probability}`` summing to 1.

    Raises:
        ValueError: on an empty mapping, a non-positive weight or temperature.
    """
    if not weights:
        raise ValueError("the training mixture has no corpora")
    if temperature <= 0:
        raise ValueError(f"data.temperature must be > 0, got {temperature}")
    bad = {k: w for k, w in weights.items() if not w or w <= 0}
    if bad:
        raise ValueError(f"corpus weights must be > 0, got {bad}")
    scaled = {k: float(w) ** (1.0 / temperature) for k, w in weights.items()}
    total = sum(scaled.values())
    return {k: v / total for k, v in scaled.items()}


class MixtureStream:
    """Draws each sample's corpus with :func:`mixture_probs` probabilities, then its next sample.

    Args:
        corpora: ``{name: shard urls}``.
        probs: ``{name: probability}`` (same keys).
        seed: entropy for the generators (e.g. ``[seed, logical_id]``).
        rejects: shared reject counter.
        weights: ``{name: shard draw weights}`` for some corpora (:func:`plan_shards`); the others draw uniformly.
    """

    def __init__(
        self,
        corpora: Mapping[str, Sequence[str]],
        probs: Mapping[str, float],
        seed: Sequence[int],
        rejects: RejectCounter,
        weights: Mapping[str, Sequence[int] | None] | None = None,
    ):
        self.names = list(corpora)
        self.cum = np.cumsum([probs[n] for n in self.names])
        self.cum[-1] = 1.0
        self.rng = np.random.default_rng(np.random.SeedSequence([*seed, 0]))
        weights = weights or {}
        self.streams = {
            n: CorpusStream(n, corpora[n], [*seed, 1 + i], rejects, weights.get(n))
            for i, n in enumerate(self.names)
        }

    def state(self) -> dict:
        """Generator state of the mixture and of every corpus stream."""
        return {
            "rng": self.rng.bit_generator.state,
            "corpora": {n: s.state() for n, s in self.streams.items()},
        }

    def load_state(self, state: Mapping) -> None:
        """Restore :meth:`state`."""
        self.rng.bit_generator.state = state["rng"]
        for n, s in self.streams.items():
            s.load_state(state["corpora"][n])

    def next(self) -> dict:
        """Next raw sample of a corpus drawn by weight."""
        i = int(np.searchsorted(self.cum, self.rng.random(), side="right"))
        return self.streams[self.names[min(i, len(self.names) - 1)]].next()


class TrainStream(IterableDataset):
    """Infinite stream of ready training batches from a weighted corpus mixture (module docstring).

    Use with ``DataLoader(stream, batch_size=None, collate_fn=identity)``: batching happens here.

    Args:
        corpora: ``{name: shard urls}``.
        probs: ``{name: sampling probability}``.
        tokenizer: LLM tokenizer with chat template and audio tokens.
        audio_token_counter: the model's :class:`~aero_lightning.model.aero.AudioTokenCounter`.
        mode: ``padded`` or ``packed``.
        packing_length: LLM tokens per micro-batch (audio + text; padded tokens count in ``padded`` mode).
        buffer_size: samples planned together (a larger block packs tighter and costs host memory: the block's
            encoded audio bytes are held).
        seed: base seed.
        max_duration_s: skip longer samples (seconds), or None.
        end_of_turn_token: the chat template's end-of-turn token.
        resume: ``{worker slot: data_state}`` handed out by the datamodule to restore exact positions.
        encoder_cache: read each sample's cached encoder frames instead of decoding its audio: the keyword
            arguments of :class:`~aero_lightning.data.encoder_cache.EncoderCacheReader` (``shards`` maps every
            audio shard to its cache shard), built in each worker. Batches then carry ``encoder_states`` in place of
            ``audio_pcm`` (:mod:`aero_lightning.data.packing`); planning and costs are unchanged (from the JSON).

    Raises:
        ValueError: on an unknown ``mode`` or ``packing_length < 1``.
    """

    def __init__(
        self,
        corpora: Mapping[str, Sequence[str]],
        probs: Mapping[str, float],
        tokenizer,
        audio_token_counter,
        mode: str = "packed",
        packing_length: int = 4096,
        buffer_size: int = 1000,
        seed: int = 0,
        max_duration_s: float | None = None,
        end_of_turn_token: str = "<|im_end|>",
        resume: Mapping[int, Mapping] | None = None,
        encoder_cache: Mapping | None = None,
    ):
        super().__init__()
        if mode not in PACKING_MODES:
            raise ValueError(f"data.packing.mode must be one of {PACKING_MODES}, got {mode!r}")
        if packing_length < 1:
            raise ValueError(f"data.packing.packing_length must be >= 1, got {packing_length}")
        self.corpora = {k: list(v) for k, v in corpora.items()}
        self.probs = dict(probs)
        self.tokenizer = tokenizer
        self.counter = audio_token_counter
        self.mode = mode
        self.packing_length = int(packing_length)
        self.buffer_size = int(buffer_size)
        self.seed = int(seed)
        self.max_duration_s = max_duration_s
        self.end_of_turn_token = end_of_turn_token
        self.resume = dict(resume or {})
        self.encoder_cache = dict(encoder_cache) if encoder_cache else None
        self._cache_reader: EncoderCacheReader | None = None

    def __getstate__(self) -> dict:
        # a cache reader holds open files: each DataLoader worker opens its own
        return self.__dict__ | {"_cache_reader": None}

    # ------------------------------------------------------------------ per-sample work
    def _meta(self, raw: dict, rejects: RejectCounter) -> dict | None:
        """Parse JSON, tokenise and cost one raw sample; None (counted) if it must be skipped."""
        item = parse_sample(raw, rejects, self.max_duration_s)
        if item is None:
            return None
        key, messages = item["key"], item["messages"]
        label = sample_label(key, item["shard"])
        try:
            counts = [self.counter(n) for n in item["clip_samples"]]
            enc = encode_chat(self.tokenizer, messages, counts, self.end_of_turn_token)
        except (ValueError, KeyError, TypeError) as err:
            rejects.reject("bad_messages", label, str(err))
            return None
        cost = len(enc.input_ids)
        if cost > self.packing_length:
            rejects.reject("over_budget", label, f"{cost} tokens > packing_length={self.packing_length}")
            return None
        return {
            "key": key,
            "corpus": item["corpus"],
            "task": item["task"],
            "messages": messages,
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "num_samples": item["num_samples"],
            "clip_samples": item["clip_samples"],
            "audio": item["audio"],
            "shard": item["shard"],
            "cost": cost,
        }

    def _decode(self, item: dict, rejects: RejectCounter) -> dict | None:
        """Decode one planned sample's audio clips, or read their cached encoder frames; None (counted) if one is
        unusable or not cached."""
        if self._cache_reader is not None:
            cached = self._cache_reader.read(item, rejects, self.counter)
            if cached is None:
                return None
            states, clip_samples = cached
            return {k: v for k, v in item.items() if k != "audio"} | {
                "encoder_states": states,
                "clip_samples": clip_samples,
            }
        clips = decode_clips(item, rejects, self.counter)
        if clips is None:
            return None
        return {k: v for k, v in item.items() if k != "audio"} | {"waveforms": clips}

    # ------------------------------------------------------------------ iteration
    def _plan(self, logical: int, total: int) -> dict[str, tuple[list[str], list[int] | None]]:
        """``{corpus: (shards, weights)}`` of reader ``logical`` of ``total`` (:func:`plan_shards`)."""
        return {name: plan_shards(urls, logical, total) for name, urls in self.corpora.items()}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            ignore_job_signals()
        slot, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = dist_rank_world()
        restored = self.resume.get(slot)
        logical = int(restored["logical_id"]) if restored else rank * num_workers + slot
        total = world * num_workers
        small = [n for n, u in self.corpora.items() if len(u) < total]
        if small and logical == 0:
            logger.info(
                "corpora %s have fewer shards than ranks x workers (%d): each of their shards is shared by "
                "several readers, which differ by seed",
                small,
                total,
            )
        rejects = RejectCounter()
        if self.encoder_cache is not None:  # per iterator: it holds open files, which do not cross processes
            if self._cache_reader is not None:
                self._cache_reader.close()
            self._cache_reader = EncoderCacheReader(**self.encoder_cache)
        plan = self._plan(logical, total)
        mixture = MixtureStream(
            {name: shards for name, (shards, _) in plan.items()},
            self.probs,
            [self.seed, logical],
            rejects,
            weights={name: weights for name, (_, weights) in plan.items()},
        )
        collate = make_collate(self.mode, self.counter, pad_token_id(self.tokenizer))
        block, skip = 0, 0
        if restored and "block_start" in restored:
            mixture.load_state(restored["block_start"])
            rejects.update(restored["rejects_at_block_start"])
            block, skip = int(restored["block"]), int(restored["emitted"])
        while True:
            block_start, rejects_at_start = mixture.state(), dict(rejects)
            items = []
            while len(items) < self.buffer_size:
                item = self._meta(mixture.next(), rejects)
                if item is not None:
                    items.append(item)
            batches = plan_batches([it["cost"] for it in items], self.packing_length, self.mode)
            order = np.random.default_rng(np.random.SeedSequence([self.seed, logical, block, 7])).permutation(
                len(batches)
            )
            if skip:
                rejects.clear()
                rejects.update(restored["rejects"])
            for j in range(skip, len(batches)):
                samples = [s for i in batches[order[j]] if (s := self._decode(items[i], rejects)) is not None]
                if not samples:
                    continue
                batch = collate(samples)
                batch["data_state"] = {
                    "logical_id": logical,
                    "slot": slot,
                    "block": block,
                    "emitted": j + 1,
                    "block_start": block_start,
                    "rejects_at_block_start": rejects_at_start,
                    "rejects": dict(rejects),
                }
                yield batch
            block, skip = block + 1, 0


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its end-of-sequence id when it has no pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def identity(batch):
    """Collate function for a DataLoader over :class:`TrainStream` (batches are built in the stream)."""
    return batch
