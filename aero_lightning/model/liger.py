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
from torch import nn
from torch.distributed.tensor import DTensor
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


_warned_partitioned = False


def is_partitioned(weight: torch.Tensor) -> bool:
    """True for a weight whose full value is not held by this process outside its module's forward.

    DeepSpeed ZeRO-3 marks the parameters it partitions with ``ds_id``/``ds_numel`` (their ``data`` is an empty
    tensor except while a forward hook has gathered them); FSDP2 keeps them as ``DTensor`` shards.
    """
    return hasattr(weight, "ds_id") or isinstance(weight, DTensor)


def _project(head: nn.Module | torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    # Through the module's forward when there is one: ZeRO-3 gathers a partitioned weight in the hooks of the
    # module that owns it; a bare read of ``head.weight`` outside that forward (the chunk's recompute in backward)
    # sees the empty partition.
    return head(hidden) if isinstance(head, nn.Module) else F.linear(hidden, head)


def _chunk_loss(hidden: torch.Tensor, head: nn.Module | torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = _project(head, hidden).float()  # (chunk, V)
    return F.cross_entropy(logits, targets, reduction="none")  # (chunk,)


def _fused_allowed(weight: torch.Tensor) -> bool:
    """False (with a warning, once per process) when Liger's kernel cannot take ``weight`` as it is."""
    global _warned_partitioned
    if not is_partitioned(weight):
        return True
    if not _warned_partitioned:
        logger.warning(
            "model.liger: the LM head weight is partitioned (DeepSpeed ZeRO-3 or FSDP2); Liger's fused linear "
            "cross-entropy needs the whole weight, so the loss uses the chunked PyTorch path through the LM head "
            "module instead (same value, without the fused kernel's memory and speed gains)"
        )
        _warned_partitioned = True
    return False


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    head: nn.Module | torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
    use_liger: bool = False,
    token_losses: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the LM head's logits at the target positions, without full logits.

    The projection runs chunk by chunk through ``head``'s forward, also when a chunk is recomputed in the
    backward pass (activation checkpointing), so DeepSpeed ZeRO-3 gathers a partitioned head weight (its module
    hooks do) every time it is used.

    Args:
        hidden: ``(..., D)`` final hidden states, already aligned with ``labels`` (the caller shifts).
        head: the LM head module (``nn.Linear(D, V)``, e.g. ``llm.get_output_embeddings()``), or its ``(V, D)``
            weight. Pass the module under ZeRO-3: a bare weight tensor is not gathered.
        labels: ``(...)`` target ids, -100 where no loss is taken.
        chunk_tokens: target positions projected to the vocabulary at once (peak logits memory
            ``chunk_tokens x V`` floats, recomputed in backward).
        use_liger: use Liger's fused kernel (CUDA + liger-kernel) for the selected positions. When the head
            weight is partitioned (ZeRO-3 ``ds_id``, FSDP2 ``DTensor``) the chunked path is used instead, with a
            warning once per process: the fused kernel reads the raw weight and computes its gradient inside its
            forward, outside the hooks through which ZeRO-3 gathers the weight and reduces its gradient.
        token_losses: when a list is given, the ``(N_t,)`` detached loss of every target position, in the order of
            ``labels``, is appended to it (for per-task logging; not with Liger's fused kernel, which gives only the
            sum).

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
    weight = head.weight if isinstance(head, nn.Module) else head
    if use_liger and LigerFusedLinearCrossEntropyLoss is not None and _fused_allowed(weight) and rows.is_cuda:
        bias = getattr(head, "bias", None) if isinstance(head, nn.Module) else None
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
            weight, rows, targets, bias
        )
        return loss.float(), count
    params = list(head.parameters()) if isinstance(head, nn.Module) else [head]
    needs_grad = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in params))
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        end = start + chunk_tokens
        if needs_grad:
            losses = checkpoint(_chunk_loss, rows[start:end], head, targets[start:end], use_reentrant=False)
        else:
            losses = _chunk_loss(rows[start:end], head, targets[start:end])
        total = total + losses.sum()
        if token_losses is not None:
            token_losses.append(losses.detach())
    return total, count


def liger_options(liger: Mapping | bool | None) -> dict[str, bool]:
    """Normalise the ``model.liger`` config: ``true`` / ``false`` / ``{enabled, rope, rms_norm, swiglu,
    fused_linear_cross_entropy}``."""
    keys = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")
    if isinstance(liger, bool) or liger is None:
        return dict.fromkeys(keys, bool(liger))
    enabled = bool(liger.get("enabled", True))
    return {k: enabled and bool(liger.get(k, True)) for k in keys}
