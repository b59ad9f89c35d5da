"""WebDataset streaming of prepared corpus splits into padded training and generation batches.

Training reads an infinite, resampled stream of shards (training is step-based, so no rank can run dry: finite
per-rank shard lists hang DDP, webdataset issues 188 and 225) through a shuffle buffer. Validation and test sets
are finite and read in order. Workers only decode FLAC; log-mel is computed on the accelerator by the model.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from aero_lightning.data.chat import IGNORE_INDEX, encode_chat, prompt_messages, reference_text
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.shards import decode_audio, read_manifest, shard_urls

logger = logging.getLogger(__name__)


def resolve_split(folder: str | Path) -> list[str]:
    """Shard urls of a prepared split folder, checked before any training starts.

    Raises:
        FileNotFoundError: if the folder or its ``manifest.json`` does not exist.
        ValueError: if the manifest lists no shards or a listed shard file is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data folder {folder.resolve()} does not exist; build the demo corpus with "
            "`python -m aero_lightning.data.synth --out DIR` or point data.*_dir at a prepared split"
        )
    manifest = read_manifest(folder)
    urls = shard_urls(folder, manifest)
    if not urls:
        raise ValueError(f"{folder.resolve()}/manifest.json lists no shards: the split is empty, rebuild it")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} shard(s) listed in {folder}/manifest.json are missing, e.g. {missing[0]}"
        )
    return urls


class SampleDecoder:
    """Turn a raw WebDataset sample into ``{key, waveform, messages, duration_s, corpus}`` or None.

    Bad samples are skipped and counted by reason (``rejected``), and logged with their key; never raised.

    Args:
        max_duration_s: samples longer than this are skipped (reason ``too_long``).
    """

    def __init__(self, max_duration_s: float | None = None):
        self.max_duration_s = max_duration_s
        self.rejected: Counter[str] = Counter()

    def _reject(self, key: str, reason: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        logger.warning(
            "skipping sample %s: %s %s (rejected so far: %s)", key, reason, detail, dict(self.rejected)
        )

    def __call__(self, raw: dict) -> dict | None:
        key = raw.get("__key__", "?")
        if "json" not in raw or "flac" not in raw:
            self._reject(key, "missing_member", f"has {sorted(k for k in raw if not k.startswith('__'))}")
            return None
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as err:
            self._reject(key, "bad_json", str(err))
            return None
        try:
            waveform, sr = decode_audio(raw["flac"])
        except Exception as err:  # noqa: BLE001 - libsndfile raises several types for corrupt audio
            self._reject(key, "corrupt_audio", str(err))
            return None
        if sr != SAMPLE_RATE_HZ:
            self._reject(key, "sample_rate", f"{sr} Hz, shards must be {SAMPLE_RATE_HZ} Hz")
            return None
        if waveform.size == 0:
            self._reject(key, "empty_audio")
            return None
        duration_s = waveform.size / SAMPLE_RATE_HZ
        if self.max_duration_s is not None and duration_s > self.max_duration_s:
            self._reject(key, "too_long", f"{duration_s:.1f} s > {self.max_duration_s} s")
            return None
        messages = meta.get("messages")
        if not messages or not reference_text(messages).strip():
            self._reject(key, "empty_text")
            return None
        return {
            "key": key,
            "waveform": waveform.astype(np.float32, copy=False),
            "messages": messages,
            "duration_s": duration_s,
            "corpus": meta.get("corpus", ""),
        }


def _not_none(sample):
    return sample is not None


def make_dataset(
    urls: Sequence[str],
    train: bool,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    max_duration_s: float | None = None,
) -> wds.WebDataset:
    """WebDataset pipeline over shard ``urls``.

    Args:
        urls: shard paths.
        train: infinite resampled stream with a shuffle buffer; otherwise one ordered pass split by rank x worker.
        shuffle_buffer: samples held for shuffling (train only).
        seed: shard-resampling and shuffle seed.
        max_duration_s: skip longer samples.
    """
    decoder = SampleDecoder(max_duration_s=max_duration_s)
    if train:
        ds = wds.WebDataset(
            list(urls),
            resampled=True,
            shardshuffle=False,
            seed=seed,
            handler=wds.warn_and_continue,
            empty_check=False,
        )
        ds = ds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100))
    else:
        ds = wds.WebDataset(
            list(urls),
            shardshuffle=False,
            handler=wds.warn_and_continue,
            empty_check=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
        )
    return ds.map(decoder).select(_not_none)


@dataclass
class AsrCollator:
    """Padded batches of chat samples with their audio cut into 30 s windows.

    Args:
        tokenizer: LLM tokenizer with chat template and audio tokens.
        audio_token_counter: clip samples -> ``<|AUDIO|>`` slots (``AeroModel.audio_token_counter()``).
        for_generation: build prompts up to the generation prompt, left-padded, with the reference text kept.
        end_of_turn_token: the chat template's end-of-turn token.

    A batch holds ``input_ids (B, L)``, ``attention_mask (B, L)``, ``labels (B, L)`` (-100 outside replies and on
    padding), ``audio_windows (W, N)`` float32 16 kHz (windows of all samples in order, zero-padded to the longest),
    ``window_lengths (W,)`` samples, ``audio_samples (B,)`` samples per clip, and lists ``keys``, ``references``,
    ``corpora``.
    """

    tokenizer: object
    audio_token_counter: Callable[[int], int]
    for_generation: bool = False
    end_of_turn_token: str = "<|im_end|>"

    def __call__(self, samples: list[dict]) -> dict:
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoded, windows = [], []
        for s in samples:
            n = int(s["waveform"].shape[0])
            messages = prompt_messages(s["messages"]) if self.for_generation else s["messages"]
            enc = encode_chat(
                tok,
                messages,
                [self.audio_token_counter(n)],
                self.end_of_turn_token,
                add_generation_prompt=self.for_generation,
            )
            encoded.append(enc)
            start = 0
            for length in self.audio_token_counter.window_lengths(n):
                windows.append(s["waveform"][start : start + length])
                start += length
        batch_size = len(samples)
        max_len = max(len(e.input_ids) for e in encoded)
        input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            sl = slice(max_len - n, max_len) if self.for_generation else slice(0, n)
            input_ids[i, sl] = torch.tensor(e.input_ids)
            labels[i, sl] = torch.tensor(e.labels)
            attention_mask[i, sl] = 1
        window_lengths = torch.tensor([len(w) for w in windows], dtype=torch.long)
        audio_windows = torch.zeros((len(windows), int(window_lengths.max())), dtype=torch.float32)
        for i, w in enumerate(windows):
            audio_windows[i, : len(w)] = torch.from_numpy(np.ascontiguousarray(w))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "audio_windows": audio_windows,
            "window_lengths": window_lengths,
            "audio_samples": torch.tensor([int(s["waveform"].shape[0]) for s in samples], dtype=torch.long),
            "keys": [s["key"] for s in samples],
            "references": [reference_text(s["messages"]) for s in samples],
            "corpora": [s["corpus"] for s in samples],
        }


class AeroDataModule(L.LightningDataModule):
    """Training stream, named validation sets and a test set, from prepared split folders.

    Args:
        train_dirs: split folders mixed uniformly by shard for training (weighted mixtures arrive with the
            multi-corpus stream).
        val_dirs: ``{name: folder}`` finite validation sets, one per corpus.
        test_dir: folder decoded after training (WER), or None.
        batch_size: samples per training micro-batch.
        eval_batch_size: samples per validation / generation batch.
        num_workers: DataLoader worker processes (decode only).
        shuffle_buffer: training shuffle buffer, samples.
        max_duration_s: skip longer training samples.
        seed: stream seed.
    """

    def __init__(
        self,
        train_dirs: Sequence[str],
        val_dirs: dict[str, str] | None = None,
        test_dir: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        max_duration_s: float | None = 60.0,
        seed: int = 0,
    ):
        super().__init__()
        self.train_dirs = list(train_dirs)
        self.val_dirs = dict(val_dirs or {})
        self.test_dir = test_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.max_duration_s = max_duration_s
        self.seed = seed
        self.tokenizer = None
        self.audio_token_counter = None

    def check(self) -> None:
        """Resolve every configured folder now, so a bad path fails before the model trains.

        Raises:
            FileNotFoundError / ValueError: see :func:`resolve_split`.
        """
        for folder in [
            *self.train_dirs,
            *self.val_dirs.values(),
            *([self.test_dir] if self.test_dir else []),
        ]:
            resolve_split(folder)

    def bind_model(self, tokenizer, audio_token_counter: Callable[[int], int]) -> None:
        """Give the collators the model's tokenizer and audio token counter."""
        self.tokenizer = tokenizer
        self.audio_token_counter = audio_token_counter

    def _collator(self, for_generation: bool) -> AsrCollator:
        if self.tokenizer is None:
            raise RuntimeError(
                "AeroDataModule.bind_model(tokenizer, counter) must be called before loading data"
            )
        return AsrCollator(self.tokenizer, self.audio_token_counter, for_generation=for_generation)

    def _loader(self, ds, batch_size: int, for_generation: bool, workers: int) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=self._collator(for_generation),
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        urls = [u for d in self.train_dirs for u in resolve_split(d)]
        ds = make_dataset(
            urls,
            train=True,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            max_duration_s=self.max_duration_s,
        )
        return self._loader(ds, self.batch_size, False, self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(make_dataset(resolve_split(d), train=False), self.eval_batch_size, False, 0)
            for d in self.val_dirs.values()
        ]

    def test_dataloader(self) -> DataLoader:
        if not self.test_dir:
            raise ValueError("data.test_dir is not set; nothing to decode")
        return self._loader(
            make_dataset(resolve_split(self.test_dir), train=False), self.eval_batch_size, True, 0
        )
