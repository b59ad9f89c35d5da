"""Shared fixtures: tiny real components written with ``save_pretrained`` and loaded with ``from_pretrained``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny import build_tiny
from transformers import AutoTokenizer

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT, asr_messages, encode_chat
from aero_lightning.data.datamodule import AsrCollator
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.build import build_aero_model
from aero_lightning.model.projector import MLPStackProjector

SAMPLE_RATE_HZ = 16000
TINY_TEXTS = [
    DEFAULT_ASR_PROMPT,
    "Transcribe the audio.",
    "the cat sat on the mat",
    "hello world",
    "a quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "first reply",
    "second reply",
] * 4
TRANSCRIPTS = ["hello world", "the cat sat on the mat", "a quick brown fox", "sea shells", "the lazy dog"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder with ``encoder/`` (Whisper encoder) and ``llm/`` (Qwen2 LM + tokenizer), random init."""
    return build_tiny(tmp_path_factory.mktemp("tiny"), TINY_TEXTS)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir / "llm")


@pytest.fixture
def make_model(tiny_dir) -> Callable[..., AeroModel]:
    """Factory: ``make_model(encoder_kwargs=None, llm_kwargs=None, projector=None, **AeroModel kwargs)``."""

    def make(encoder_kwargs=None, llm_kwargs=None, projector=None, **kwargs) -> AeroModel:
        torch.manual_seed(0)  # the projector is freshly initialised
        return build_aero_model(
            encoder={"name_or_path": str(tiny_dir / "encoder"), **(encoder_kwargs or {})},
            llm={"name_or_path": str(tiny_dir / "llm"), **(llm_kwargs or {})},
            projector=projector or functools.partial(MLPStackProjector, stack_factor=4, hidden_dim=128),
            **kwargs,
        )

    return make


@pytest.fixture
def model(make_model) -> AeroModel:
    return make_model()


def _make_samples(durations_s: Sequence[float], seed: int = 0) -> list[dict]:
    """Synthetic decoded samples (the dicts the shard reader yields): noise waveforms at 16 kHz."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, duration_s in enumerate(durations_s):
        n = max(1, round(duration_s * SAMPLE_RATE_HZ))
        samples.append(
            {
                "key": f"utt{i}",
                "waveform": (0.1 * rng.standard_normal(n)).astype(np.float32),
                "messages": asr_messages(TRANSCRIPTS[i % len(TRANSCRIPTS)]),
                "duration_s": n / SAMPLE_RATE_HZ,
                "corpus": "synthetic",
            }
        )
    return samples


def _make_batch(model: AeroModel, samples: list[dict], for_generation: bool = False) -> dict:
    """Collate ``samples`` for ``model`` and add its log-mel ``input_features`` / ``feature_lengths``."""
    batch = AsrCollator(model.tokenizer, model.audio_token_counter(), for_generation=for_generation)(samples)
    features, feature_lengths = model.compute_features(batch["audio_pcm"], batch["window_lengths"])
    batch["input_features"], batch["feature_lengths"] = features, feature_lengths
    return batch


def _make_encoded(tokenizer, counter, durations_s: Sequence[float], seed: int = 0) -> list[dict]:
    """:func:`_make_samples` tokenised for training: each sample also holds ``input_ids`` and ``labels``."""
    out = []
    for s in _make_samples(durations_s, seed=seed):
        enc = encode_chat(tokenizer, s["messages"], [counter(len(s["waveform"]))])
        out.append(s | {"input_ids": enc.input_ids, "labels": enc.labels})
    return out


@pytest.fixture(scope="session")
def make_samples() -> Callable[..., list[dict]]:
    return _make_samples


@pytest.fixture(scope="session")
def make_encoded() -> Callable[..., list[dict]]:
    """Factory ``make_encoded(tokenizer, counter, durations_s, seed=0)`` of pre-tokenised samples."""
    return _make_encoded


@pytest.fixture(scope="session")
def make_batch() -> Callable[..., dict]:
    return _make_batch
