"""Projectors from encoder frames to LLM input embeddings.

Both work per window on ``(W, S, D_enc)`` hidden states with ``(W,)`` valid lengths, and the number of output
tokens is a pure function of the valid length (:meth:`Projector.output_lengths`), so the data pipeline can count
a sample's audio tokens from its duration before any audio is decoded.
"""

from __future__ import annotations

import torch
from torch import nn

from aero_lightning.data.audio_tokens import projected_tokens


def _group_frames(hidden: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero frames past ``lengths`` and fold groups of ``k`` consecutive frames.

    Args:
        hidden: ``(W, S, D)``.
        lengths: ``(W,)`` valid frames.
        k: group size.

    Returns:
        ``(W, G, k, D)`` grouped frames (zeros beyond each row's length) and ``(W, G, k)``
        validity mask, ``G = projected_tokens(S, k)``.
    """
    num_windows, seq_len, dim = hidden.shape
    valid = torch.arange(seq_len, device=hidden.device)[None, :] < lengths[:, None]  # (W, S)
    hidden = hidden * valid[..., None].to(hidden.dtype)
    groups = projected_tokens(seq_len, k)
    pad = groups * k - seq_len
    if pad:
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))  # (W, groups * k, D)
        valid = nn.functional.pad(valid, (0, pad))
    return hidden.view(num_windows, groups, k, dim), valid.view(num_windows, groups, k)


class Projector(nn.Module):
    """Base class: maps ``(W, S, D_enc)`` encoder frames to ``(W, S', D_llm)`` LLM embeddings."""

    downsample: int = 1

    def output_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Output tokens for ``lengths`` valid encoder frames
        (:func:`~aero_lightning.data.audio_tokens.projected_tokens`)."""
        return projected_tokens(lengths, self.downsample)


class MLPStackProjector(Projector):
    """Stack ``k`` consecutive frames, then Linear-GELU-Linear (tiny-audio: k=5, hidden 2048).

    A final partial group is zero-padded, so ``S`` frames give ``projected_tokens(S, k)`` tokens.

    Args:
        encoder_dim: encoder width ``D_enc``.
        llm_dim: LLM hidden size ``D_llm``.
        stack_factor: frames stacked per token ``k``.
        hidden_dim: MLP hidden width.
        output_norm: RMSNorm on the output (as Ultravox's ``ln_post``), so the audio embeddings keep a fixed scale.
    """

    def __init__(
        self,
        encoder_dim: int,
        llm_dim: int,
        stack_factor: int = 5,
        hidden_dim: int = 2048,
        output_norm: bool = False,
    ):
        super().__init__()
        self.downsample = stack_factor
        self.fc1 = nn.Linear(encoder_dim * stack_factor, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, llm_dim)
        self.norm = nn.RMSNorm(llm_dim, eps=1e-6) if output_norm else None

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``hidden (W, S, D_enc)``, ``lengths (W,)``. Returns ``(W, G, D_llm)`` and lengths."""
        grouped, _ = _group_frames(hidden, lengths, self.downsample)  # (W, S/k, k, D)
        stacked = grouped.flatten(2)  # (W, S/k, k*D)
        out = self.fc2(self.act(self.fc1(stacked)))
        return (out if self.norm is None else self.norm(out)), self.output_lengths(lengths)


class AvgPoolProjector(Projector):
    """Aero-1-Audio / Qwen2-Audio projector: average-pool pairs of frames, then one Linear.

    50 Hz Whisper frames become 25 tokens per second of audio, 750 per 30 s window. A final odd frame is averaged
    alone (only valid frames are counted), so ``S`` frames give ``projected_tokens(S, pool)`` tokens.

    Args:
        encoder_dim: encoder width ``D_enc`` (1280 for Whisper-large-v3).
        llm_dim: LLM hidden size ``D_llm`` (1536 for Qwen2.5-1.5B).
        pool: frames averaged per token.
    """

    def __init__(self, encoder_dim: int, llm_dim: int, pool: int = 2):
        super().__init__()
        self.downsample = pool
        self.linear = nn.Linear(encoder_dim, llm_dim)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``hidden (W, S, D_enc)``, ``lengths (W,)``. Returns ``(W, G, D_llm)`` and lengths."""
        grouped, valid = _group_frames(hidden, lengths, self.downsample)  # (W, S/p, p, D), (W, S/p, p)
        counts = valid.sum(-1, keepdim=True).clamp_min(1).to(hidden.dtype)  # (W, S/p, 1)
        pooled = grouped.sum(2) / counts  # (W, S/p, D)
        return self.linear(pooled), self.output_lengths(lengths)


PROJECTORS = {"mlp_stack": MLPStackProjector, "avgpool_linear": AvgPoolProjector}
"""Projector types by config name (``model/projector`` and the ``projector`` entry of saved configs)."""


def projector_spec(projector: Projector) -> dict:
    """The keyword arguments that rebuild ``projector`` (``{"type": name, ...}``), for saved configs.

    Raises:
        TypeError: for a projector class not in :data:`PROJECTORS`.
    """
    kind = next((k for k, v in PROJECTORS.items() if isinstance(projector, v)), None)
    if kind is None:
        raise TypeError(f"{type(projector).__name__} is not a registered projector ({sorted(PROJECTORS)})")
    if isinstance(projector, MLPStackProjector):
        return {
            "type": kind,
            "stack_factor": projector.downsample,
            "hidden_dim": projector.fc1.out_features,
            "output_norm": projector.norm is not None,
        }
    return {"type": kind, "pool": projector.downsample}
