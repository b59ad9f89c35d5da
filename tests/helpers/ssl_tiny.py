"""Tiny random-init HuBERT / wav2vec 2.0 checkpoints for tests (``save_pretrained`` into a folder)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "conv_dim": (32,) * 7,  # the real kernels and strides: 400-sample receptive field, stride 320
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "mask_time_prob": 0.05,
    "layerdrop": 0.1,
}
_CLASSES = {"hubert": (HubertConfig, HubertModel), "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model)}


def build_tiny_ssl(out: Path, kind: str = "hubert") -> Path:
    """Write a tiny ``kind`` encoder (LayerDrop and SpecAugment on, as in the real checkpoints) to ``out``."""
    config_cls, model_cls = _CLASSES[kind]
    torch.manual_seed(0)
    model_cls(config_cls(**_TINY)).save_pretrained(out)
    return out
