"""Liger kernels on the LLM and a loss that never materialises ``(L, vocab)`` logits.

Liger (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", arXiv:2410.10989,
https://github.com/linkedin/Liger-Kernel) fuses RMSNorm, RoPE and SwiGLU, and computes the LM head and the
cross-entropy chunk by chunk (fused linear cross-entropy, FLCE). Aero applied them to the LLM only. They need
Triton and a GPU (extra ``gpu``); without them everything falls back to PyTorch with a warning.

The loss path here is used for every training and validation forward: only positions that carry a target are
projected to the vocabulary (the audio and prompt positions of an ASR sample, most of the row, never are), and
those in chunks of ``chunk_tokens`` under activation checkpointing, so at ``packing_length = 32768`` with
Qwen2.5's 151 936-token vocabulary no full logits tensor (19.9 GB in fp32) exists. On CUDA with Liger installed
the chunks are Liger's FLCE kernel instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

try:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
except ImportError:  # the `gpu` extra is not installed
    LigerFusedLinearCrossEntropyLoss = None


def liger_available() -> bool:
    """True when liger-kernel is importable and a CUDA device is present (Triton kernels need a GPU)."""
    return LigerFusedLinearCrossEntropyLoss is not None and torch.cuda.is_available()


def apply_liger(llm, rope: bool = True, rms_norm: bool = True, swiglu: bool = True) -> bool:
    """Swap the LLM's RoPE, RMSNorm and SwiGLU for Liger's kernels, in place.

    Args:
        llm: an HF causal LM (``model_type`` qwen2, qwen3, llama, mistral supported by liger-kernel).
        rope, rms_norm, swiglu: which kernels to apply.

    Returns:
        True if applied; False (with a warning) when liger-kernel or a GPU is missing or the architecture has no
        Liger patch.
    """
    if not liger_available():
        logger.warning(
            "model.liger: liger-kernel or CUDA unavailable (pip install '.[gpu]'); PyTorch kernels kept"
        )
        return False
    import liger_kernel.transformers as lk

    patch = getattr(lk, f"apply_liger_kernel_to_{llm.config.model_type}", None)
    if patch is None:
        logger.warning(
            "model.liger: liger-kernel has no patch for %s; PyTorch kernels kept", llm.config.model_type
        )
        return False
    patch(
        rope=rope,
        rms_norm=rms_norm,
        swiglu=swiglu,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=llm,
    )
    return True


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # (chunk, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
    use_liger: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels`` without full logits.

    Args:
        hidden: ``(..., D)`` final hidden states, already aligned with ``labels`` (the caller shifts).
        weight: ``(V, D)`` LM head weight.
        labels: ``(...)`` target ids, -100 where no loss is taken.
        chunk_tokens: target positions projected to the vocabulary at once (peak logits memory
            ``chunk_tokens x V`` floats, recomputed in backward).
        use_liger: use Liger's fused kernel (CUDA + liger-kernel) for the selected positions.

    Returns:
        ``(loss_sum, num_targets)``: a float32 scalar summed over target positions and their count.

    Raises:
        ValueError: if ``chunk_tokens < 1``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"model.loss_chunk_tokens must be >= 1, got {chunk_tokens}")
    keep = labels.reshape(-1) != IGNORE_INDEX
    targets = labels.reshape(-1)[keep].to(hidden.device)  # (N_t,)
    rows = hidden.reshape(-1, hidden.shape[-1])[keep.to(hidden.device)]  # (N_t, D): target positions only
    count = keep.sum()
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0, count
    if use_liger and LigerFusedLinearCrossEntropyLoss is not None and rows.is_cuda:
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
            weight, rows, targets
        )
        return loss.float(), count
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        end = start + chunk_tokens
        if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
            total = total + checkpoint(
                _chunk_loss, rows[start:end], weight, targets[start:end], use_reentrant=False
            )
        else:
            total = total + _chunk_loss(rows[start:end], weight, targets[start:end])
    return total, count


def liger_options(liger: Mapping | bool | None) -> dict[str, bool]:
    """Normalise the ``model.liger`` config: ``true`` / ``false`` / ``{enabled, rope, rms_norm, swiglu,
    fused_linear_cross_entropy}``."""
    keys = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")
    if isinstance(liger, bool) or liger is None:
        return dict.fromkeys(keys, bool(liger))
    enabled = bool(liger.get("enabled", True))
    return {k: enabled and bool(liger.get(k, True)) for k in keys}
