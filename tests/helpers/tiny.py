"""The tiny component shapes every test builds (random init, written with ``save_pretrained``), defined once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from aero_lightning.model.tiny import build_tiny_components

TINY_ENCODER = {"d_model": 64, "layers": 2, "heads": 2, "ffn_dim": 128}
"""Whisper-architecture encoder: 80 mel bins, 2 layers of width 64, 2 heads."""
TINY_LLM = {"hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}
"""Qwen2-architecture LLM: 2 layers of width 64, 4 query heads on 2 key/value heads."""
TINY_VOCAB = 300
"""Byte-level BPE vocabulary size of the tiny tokenizer (256 bytes, the special tokens, a few merges)."""


def build_tiny(out: Path, texts: Iterable[str]) -> Path:
    """Write ``out/encoder`` and ``out/llm`` (with a tokenizer trained on ``texts``) at the tiny shapes above."""
    return build_tiny_components(out, list(texts), vocab_size=TINY_VOCAB, encoder=TINY_ENCODER, llm=TINY_LLM)
