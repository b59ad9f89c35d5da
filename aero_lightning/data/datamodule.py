"""The Lightning data module: training mixture stream, named validation sets, test set, exact resume.

Training batches come from :class:`aero_lightning.data.stream.TrainStream` (weighted, resampled, token-budget
batching, padded or packed). Validation and test sets are finite passes read in order
(:class:`aero_lightning.data.shard_reader.ShardPass`), padded. Both read shards with the same reader
(:mod:`aero_lightning.data.shard_reader`): the same accepted audio members, sample checks and reject reasons.
Workers only decode audio; log-mel is computed on the accelerator by the model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

import lightning as L
import torch
from torch.utils.data import DataLoader

from aero_lightning.data.chat import (
    AUDIO_TOKEN,
    IGNORE_INDEX,
    ctc_target_mask,
    encode_chat,
    prompt_messages,
    transcript_documents,
)
from aero_lightning.data.encoder_cache import CachedSplit, EncoderFingerprint, cache_root, resolve_cache
from aero_lightning.data.packing import batch_documents, collate_padded, sample_clips
from aero_lightning.data.shard_reader import ShardPass, resolve_split, shard_sample_counts
from aero_lightning.data.shards import read_manifest
from aero_lightning.data.stream import TrainStream, identity, mixture_probs, pad_token_id
from aero_lightning.distributed import rank_and_world
from aero_lightning.errors import UserFileNotFoundError, UserValueError

logger = logging.getLogger(__name__)


def make_dataset(
    urls: Sequence[str],
    max_duration_s: float | None = None,
    expected_samples: Mapping[str, int] | None = None,
    balanced: bool = False,
) -> ShardPass:
    """Finite, ordered pass over shard ``urls`` (validation and test), split by rank x worker.

    Args:
        urls: shard paths.
        max_duration_s: skip longer samples (seconds).
        expected_samples: ``{url: num_samples}`` from the split's manifest, to count the samples a damaged shard
            loses (``missing_samples``); see :func:`~aero_lightning.data.shard_reader.shard_sample_counts`.
        balanced: the same number of samples on every rank (:func:`~aero_lightning.data.shard_reader.balanced_pass`).

    Returns:
        A :class:`~aero_lightning.data.shard_reader.ShardPass` yielding ``{key, waveform (T,) float32 16 kHz,
        messages, duration_s, corpus}`` per sample.
    """
    return ShardPass(
        urls, max_duration_s=max_duration_s, expected_samples=expected_samples, balanced=balanced
    )


@dataclass
class AsrCollator:
    """Padded batches of chat samples with their audio cut into 30 s windows (validation and generation).

    Args:
        tokenizer: LLM tokenizer with chat template and audio tokens.
        audio_token_counter: clip samples -> ``<|AUDIO|>`` slots (``AeroModel.audio_token_counter()``).
        for_generation: build prompts up to the generation prompt, left-padded, with the reference text kept.
        end_of_turn_token: the chat template's end-of-turn token.

    A batch holds ``input_ids (B, L)``, ``attention_mask (B, L)``, ``labels (B, L)`` (-100 outside replies and on
    padding), ``audio_pcm (S,)`` int16 16 kHz PCM (the 30 s windows of all samples in order, back to back),
    ``window_lengths (W,)`` samples, ``audio_samples (B,)`` samples per clip, and lists ``keys``, ``references``,
    ``corpora``.
    """

    tokenizer: object
    audio_token_counter: Callable[[int], int]
    for_generation: bool = False
    end_of_turn_token: str = "<|im_end|>"

    def __call__(self, samples: list[dict]) -> dict:
        encoded = []
        for s in samples:
            messages = prompt_messages(s["messages"]) if self.for_generation else s["messages"]
            enc = encode_chat(
                self.tokenizer,
                messages,
                [self.audio_token_counter(int(clip.shape[0])) for clip in sample_clips(s)],
                self.end_of_turn_token,
                add_generation_prompt=self.for_generation,
            )
            labels = (
                [IGNORE_INDEX] * len(enc.labels) if s.get("duplicate") else enc.labels
            )  # a repeat: no loss
            encoded.append(s | {"input_ids": enc.input_ids, "labels": labels})
        return collate_padded(
            encoded, self.audio_token_counter, pad_token_id(self.tokenizer), left_pad=self.for_generation
        )


def target_tokens(batch: Mapping) -> int:
    """Tokens that carry a loss in a batch: labels != -100 after the one-token shift (the causal LM predicts
    token ``t + 1`` from position ``t``, so the first label never has a prediction)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def ctc_target_tokens(batch: Mapping, audio_token_id: int, end_of_turn_id: int) -> int:
    """Targets of the auxiliary CTC term in a batch: reply tokens but the end-of-turn token, in documents that hold
    audio and whose reply is a transcript (:func:`~aero_lightning.data.chat.transcript_documents` of the batch's
    ``tasks``; every audio document when the batch has none): the count :func:`aero_lightning.model.ctc.ctc_loss_sum`
    returns for the same batch."""
    total = 0
    docs = batch_documents(batch["input_ids"], batch["labels"], batch.get("cu_seqlens"))
    keep = transcript_documents(batch["tasks"]) if "tasks" in batch else [True] * len(docs)
    for (ids, labels), kept in zip(docs, keep):
        if kept and bool((ids == audio_token_id).any()):
            total += int(ctc_target_mask(labels, end_of_turn_id).sum())
    return total


class AccumulationGroups:
    """Iterable over a training DataLoader that tags every micro-batch with its accumulation group's token count.

    Consecutive ``accumulate`` micro-batches form one optimizer step. Each gets ``group_target_tokens`` (the local
    target tokens of the whole group, known here because the group is read ahead before its first micro-batch is
    trained) and ``group_index`` (0 for the first). :class:`~aero_lightning.lit_module.AeroLitModule` all-reduces
    the count over ranks at ``group_index == 0`` and normalises every micro-batch's summed loss by the global
    count, so the step's gradient is the mean over all target tokens of the global batch — the same whatever the
    micro-batch size, accumulation and world size (NeMo PR 15648 and tiny-audio PR 63 fixed exactly this). With
    ``ctc_token_ids`` the group's CTC targets are counted too (``group_ctc_tokens``), so the auxiliary CTC term is
    normalised the same way.

    Args:
        loader: the training DataLoader (infinite).
        accumulate: ``trainer.accumulate_grad_batches``.
        ctc_token_ids: ``(audio_token_id, end_of_turn_id)`` to count CTC targets (:func:`ctc_target_tokens`), or
            None.
    """

    def __init__(self, loader: DataLoader, accumulate: int = 1, ctc_token_ids: tuple[int, int] | None = None):
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.loader = loader
        self.accumulate = int(accumulate)
        self.ctc_token_ids = ctc_token_ids

    def __iter__(self):
        it = iter(self.loader)
        while True:
            group = list(islice(it, self.accumulate))
            if not group:
                return
            total = sum(target_tokens(b) for b in group)
            ctc = (
                sum(ctc_target_tokens(b, *self.ctc_token_ids) for b in group) if self.ctc_token_ids else None
            )
            for i, batch in enumerate(group):
                batch["group_target_tokens"] = total
                batch["group_ctc_tokens"] = ctc
                batch["group_index"] = i
            yield from group


def _weight(folder: str, weight: float | None) -> float:
    if weight is not None:
        return float(weight)
    hours = float(read_manifest(folder).get("hours", 0.0))
    if hours <= 0:
        raise ValueError(f"{folder}/manifest.json has no hours; give the corpus an explicit weight")
    return hours


class AeroDataModule(L.LightningDataModule):
    """Weighted multi-corpus training stream, named validation sets and a test set.

    Args:
        train: ``{corpus: folder}`` or ``{corpus: {"dir": folder, "weight": w}}``; a missing weight means the
            corpus's hours from its manifest.
        val_dirs: ``{name: folder}`` finite validation sets, one per corpus.
        test_dir: folder decoded after training (WER), or None.
        temperature: mixture temperature ``T``: ``p_i ∝ w_i^(1/T)`` (see :func:`stream.mixture_probs`).
        packing: ``{"mode": "padded" | "packed", "packing_length": tokens, "buffer_size": samples}``.
        eval_batch_size: samples per validation / generation batch.
        num_workers: DataLoader worker processes for training (decode only; log-mel runs on the accelerator).
        max_duration_s: skip longer training samples (seconds), or None.
        seed: stream seed.
        pin_memory: page-locked training batches, for an asynchronous host-to-device copy (None: when CUDA is
            available).
        prefetch_factor: training batches each worker prepares ahead (host memory: about this many batches of
            16-bit PCM per worker).
        encoder_cache: train on the frozen encoder's cached outputs (:mod:`aero_lightning.data.encoder_cache`,
            built with ``python -m aero_lightning.data.cache_encoder``) instead of decoding audio: every training
            split needs a cache of the model's encoder, the encoder must stay frozen for the whole run
            (:meth:`bind_encoder_cache`, called by :class:`~aero_lightning.lit_module.AeroLitModule` at setup), and
            training batches carry ``encoder_states`` in place of ``audio_pcm``. Validation and test still read the
            audio through the encoder.

    The training loader's position is part of the checkpoint (:meth:`state_dict`): each consumed batch carries its
    worker's stream state, and a resumed run restores every worker exactly, so it sees the same batches an
    uninterrupted run would have seen. That needs the same world size and ``num_workers``; otherwise the stream
    restarts with a new seed and a warning.
    """

    def __init__(
        self,
        train: Mapping[str, str | Mapping],
        val_dirs: Mapping[str, str] | None = None,
        test_dir: str | None = None,
        temperature: float = 1.0,
        packing: Mapping | None = None,
        eval_batch_size: int = 32,
        num_workers: int = 1,
        max_duration_s: float | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        encoder_cache: bool = False,
    ):
        super().__init__()
        self.train = {
            name: (dict(v) if isinstance(v, Mapping) else {"dir": v, "weight": None})
            for name, v in train.items()
        }
        self.val_dirs = dict(val_dirs or {})
        self.test_dir = test_dir
        self.temperature = float(temperature)
        packing = dict(packing or {})
        self.packing_mode = packing.get("mode", "packed")
        self.packing_length = int(packing.get("packing_length", 4096))
        self.buffer_size = int(packing.get("buffer_size", 1000))
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_duration_s = max_duration_s
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self.encoder_cache = bool(encoder_cache)
        self._cached_splits: dict[str, CachedSplit] | None = None
        self.tokenizer = None
        self.audio_token_counter = None
        self.end_of_turn_token = "<|im_end|>"
        self._loaded: dict | None = None
        self._reset_tracking({})

    # ------------------------------------------------------------------ checks and binding
    def check(self) -> None:
        """Resolve every configured folder and the mixture now, so bad config fails before the model trains.

        Raises:
            FileNotFoundError / ValueError: see :func:`resolve_split` and :func:`stream.mixture_probs`.
        """
        if not self.train:
            raise ValueError("data.train lists no corpora")
        for folder in [
            *(c["dir"] for c in self.train.values()),
            *self.val_dirs.values(),
            *([self.test_dir] if self.test_dir else []),
        ]:
            resolve_split(folder)
        self.mixture_probs()
        if self.encoder_cache:  # the fingerprint is checked once the model is built (bind_encoder_cache)
            for c in self.train.values():
                if not any(cache_root(c["dir"]).glob("*/manifest.json")):
                    raise UserFileNotFoundError(
                        f"data.encoder_cache=true but the training split {c['dir']} has no encoder cache "
                        f"({cache_root(c['dir'])}); build it with `python -m aero_lightning.data.cache_encoder "
                        f"split={c['dir']} encoder=...` or set data.encoder_cache=false"
                    )

    def mixture_probs(self) -> dict[str, float]:
        """Sampling probability per training corpus."""
        return mixture_probs(
            {name: _weight(c["dir"], c.get("weight")) for name, c in self.train.items()}, self.temperature
        )

    def bind_model(
        self, tokenizer, audio_token_counter: Callable[[int], int], end_of_turn_token: str = "<|im_end|>"
    ) -> None:
        """Give the stream and collators the model's tokenizer and audio token counter."""
        self.tokenizer = tokenizer
        self.audio_token_counter = audio_token_counter
        self.end_of_turn_token = end_of_turn_token

    def bind_encoder_cache(self, fingerprint: EncoderFingerprint) -> None:
        """Find every training split's cache of the model's encoder and check it (``data.encoder_cache``).

        Args:
            fingerprint: the model's encoder (:func:`~aero_lightning.data.encoder_cache.model_encoder_fingerprint`).

        Raises:
            UserError: see :func:`~aero_lightning.data.encoder_cache.resolve_cache` (no cache of this encoder, or one
                that does not cover the split); UserValueError if the splits' caches differ in dtype or width.
        """
        splits = {name: resolve_cache(c["dir"], fingerprint) for name, c in self.train.items()}
        kinds = {(s.dtype, s.hidden_size) for s in splits.values()}
        if len(kinds) > 1:
            raise UserValueError(
                f"the training splits' encoder caches differ in dtype or width: {sorted(kinds)}; rebuild them with "
                "the same cache_encoder dtype="
            )
        self._cached_splits = splits
        logger.info(
            "encoder cache %s (%s): %s",
            fingerprint.short,
            next(iter(kinds))[0],
            ", ".join(f"{name}: {s.folder}" for name, s in splits.items()),
        )

    def _encoder_cache_reader_args(self) -> dict | None:
        """Keyword arguments of the training stream's :class:`~aero_lightning.data.encoder_cache.EncoderCacheReader`."""
        if not self.encoder_cache:
            return None
        if self._cached_splits is None:
            raise RuntimeError(
                "data.encoder_cache=true: AeroDataModule.bind_encoder_cache(fingerprint) must be called before the "
                "training data is loaded (AeroLitModule does it at setup)"
            )
        first = next(iter(self._cached_splits.values()))
        return {
            "shards": {a: c for s in self._cached_splits.values() for a, c in s.shards.items()},
            "dtype": first.dtype,
            "hidden_size": first.hidden_size,
            "build_rejects": {k: v for s in self._cached_splits.values() for k, v in s.build_rejects.items()},
        }

    def _require_model(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError(
                "AeroDataModule.bind_model(tokenizer, counter) must be called before loading data"
            )

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> AccumulationGroups:
        """The training stream in accumulation groups (see :class:`AccumulationGroups`)."""
        self._require_model()
        workers = max(1, self.num_workers)
        resume = self._resume_assignment(workers)
        stream = TrainStream(
            {name: resolve_split(c["dir"]) for name, c in self.train.items()},
            self.mixture_probs(),
            self.tokenizer,
            self.audio_token_counter,
            mode=self.packing_mode,
            packing_length=self.packing_length,
            buffer_size=self.buffer_size,
            seed=self.seed + (self._reseed if resume is None else 0),
            max_duration_s=self.max_duration_s,
            end_of_turn_token=self.end_of_turn_token,
            resume=resume,
            encoder_cache=self._encoder_cache_reader_args(),
        )
        self._reset_tracking(resume or {})
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=identity,
            persistent_workers=False,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )
        trainer = getattr(self, "trainer", None)
        ids = (
            self.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
            self.tokenizer.convert_tokens_to_ids(self.end_of_turn_token),
        )
        return AccumulationGroups(
            loader, trainer.accumulate_grad_batches if trainer is not None else 1, ctc_token_ids=ids
        )

    def _eval_loader(self, folder: str, for_generation: bool) -> DataLoader:
        self._require_model()
        # with several ranks every rank gets the same number of batches (a rank short of samples repeats some, which
        # are not scored): sharded strategies all-gather parameters in every forward
        balanced = rank_and_world()[1] > 1
        return DataLoader(
            make_dataset(
                resolve_split(folder), expected_samples=shard_sample_counts(folder), balanced=balanced
            ),
            batch_size=self.eval_batch_size,
            num_workers=0,
            collate_fn=AsrCollator(
                self.tokenizer, self.audio_token_counter, for_generation, self.end_of_turn_token
            ),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(d, False) for d in self.val_dirs.values()]

    def test_dataloader(self) -> DataLoader:
        if not self.test_dir:
            raise ValueError("data.test_dir is not set; nothing to decode")
        return self._eval_loader(self.test_dir, True)

    # ------------------------------------------------------------------ exact resume
    def _reset_tracking(self, handed_out: Mapping[int, Mapping]) -> None:
        self._worker_states: dict[int, dict] = {int(k): dict(v) for k, v in handed_out.items()}
        self._consumed = 0

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record the stream state of every consumed training batch (and drop it from the batch)."""
        state = batch.pop("data_state", None) if isinstance(batch, dict) else None
        if state is not None:
            self._worker_states[int(state["slot"])] = state
            self._consumed += 1
        return batch

    def rejected_counts(self) -> dict[str, int]:
        """Training samples skipped so far on this rank, by reason (summed over the workers' consumed batches)."""
        total: Counter[str] = Counter()
        for state in self._worker_states.values():
            total.update(state.get("rejects", {}))
        return dict(total)

    def _local_state(self) -> dict:
        rank, world = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size())
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else (0, 1)
        )
        return {
            "rank": rank,
            "world_size": world,
            "num_workers": max(1, self.num_workers),
            "consumed": self._consumed,
            "workers": self._worker_states,
        }

    def state_dict(self) -> dict:
        """Every rank's training-stream position (gathered from all ranks; Lightning calls this on each rank)."""
        local = self._local_state()
        ranks = [local]
        if local["world_size"] > 1:
            ranks = [None] * local["world_size"]
            torch.distributed.all_gather_object(ranks, local)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the saved positions; the next :meth:`train_dataloader` restores them."""
        self._loaded = state_dict

    def _resume_assignment(self, workers: int) -> dict[int, dict] | None:
        """``{worker slot: state}`` so the new loader continues where the saved one stopped.

        A fresh DataLoader asks its workers for batches in round-robin order starting at slot 0, while the saved
        loader's next batch was due from slot ``consumed % workers``; slot ``w`` therefore takes the state of the
        saved slot ``(w + consumed) % workers``.
        """
        self._reseed = 0
        if not self._loaded:
            return None
        loaded, self._loaded = self._loaded, None
        local = self._local_state()
        ranks = loaded.get("ranks", [])
        if len(ranks) != local["world_size"] or any(r["num_workers"] != workers for r in ranks):
            self._reseed = 1 + sum(r["consumed"] for r in ranks)
            logger.warning(
                "checkpoint data state is for %d rank(s) x %s workers, this run has %d x %d: exact data resume "
                "is impossible, the training stream restarts with seed offset %d",
                len(ranks),
                sorted({r["num_workers"] for r in ranks}),
                local["world_size"],
                workers,
                self._reseed,
            )
            return None
        saved = ranks[local["rank"]]
        states = {int(k): v for k, v in saved["workers"].items()}
        base = local["rank"] * workers
        assignment = {}
        for w in range(workers):
            old = (w + saved["consumed"]) % workers
            assignment[w] = states.get(old, {"logical_id": base + old})
        return assignment
