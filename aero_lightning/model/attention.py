"""Padding-free packed attention for the encoder and the LLM.

A packed row holds several documents back to back (``cu_seqlens``); attention must stay inside each document
and must not build an ``L x L`` mask (at ``packing_length = 32768`` a boolean one is 1 GiB per layer call).

``model.attn_implementation`` selects the backend of both the encoder and the LLM:

- ``flash_attention_2``: transformers' flash-attn integration, varlen kernels driven by ``cu_seq_lens_q/k``
  (needs the ``flash`` extra; the ``gpu`` extra no longer pulls flash-attn, which builds from source).
- ``varlen`` (registered here): on CUDA in bf16/fp16, PyTorch's ``torch.nn.attention.varlen.varlen_attn``
  (FlashAttention kernels shipped with PyTorch, no extra package; under autocast q, k and v are cast to the
  autocast dtype first); elsewhere (CPU, fp32) one
  ``scaled_dot_product_attention`` call per document. The per-document loop is the CPU reference path: it was
  measured fastest on CPU (58 ms fwd+bwd at L=4096 vs 332 ms with a dense block mask; ``benchmarks/varlen_cpu.py``).
- ``sdpa`` / ``eager``: transformers' own; a packed row then gets transformers' dense per-document mask, built from
  the restarting ``position_ids`` (fine for tests and short rows, not for 32768).

Without ``cu_seq_lens_q`` in the call (padded batches, generation with a KV cache) ``varlen`` is exactly
transformers' ``sdpa``, masks included.

Importing this module registers ``varlen`` with transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (the mask function returns None for unpadded rows so no dense mask is built).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

try:  # PyTorch >= 2.9 ships FlashAttention varlen kernels (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

VARLEN = "varlen"
PACKED_IMPLEMENTATIONS = ("varlen", "flash_attention_2", "flash_attention_3")
"""Backends that take a packed row through ``cu_seq_lens_q/k`` without a dense mask."""


def packed_attention_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> dict:
    """Keyword arguments that carry a packed row's document boundaries to every attention call.

    transformers forwards these names (``TransformersKwargs``) from the model's ``forward`` down to the attention
    function; its flash-attn integration and :func:`varlen_attention_forward` both read them.

    Args:
        cu_seqlens: ``(D+1,)`` int32 cumulative document lengths.
        max_seqlen: longest document (computed when None).

    Returns:
        ``{"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}``.
    """
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_seqlen, "max_length_k": max_seqlen}


def _varlen_kernel_applies(query: torch.Tensor, dropout: float) -> bool:
    """Whether PyTorch's fused varlen kernel can take this call: CUDA, bf16/fp16, no dropout."""
    return (
        varlen_attn is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
    )


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a packed row, document by document (transformers attention-function signature).

    Args:
        module: the attention module (``is_causal`` and ``num_key_value_groups`` are read from it).
        query: ``(1, H, L, head_dim)``.
        key, value: ``(1, H_kv, L, head_dim)``.
        attention_mask: must be None for a packed row.
        dropout: attention dropout probability.
        scaling: softmax scale (``head_dim ** -0.5`` when None).
        is_causal: overrides ``module.is_causal``.
        **kwargs: ``cu_seq_lens_q`` ``(D+1,)`` and ``max_length_q`` from :func:`packed_attention_kwargs`; without
            them the call is transformers' ``sdpa``.

    Returns:
        ``(attn_output (1, L, H, head_dim), None)``.

    Raises:
        ValueError: if a packed row comes with a batch dimension other than 1 or with a dense mask.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(
            "packed attention takes one row (batch 1) and no attention_mask; got batch "
            f"{query.shape[0]} and mask {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    heads, kv_heads = query.shape[1], key.shape[1]
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the projections are low precision but Qwen2's rotary embedding returns fp32 q and k, so
        # without this cast every layer would leave the fused kernel for the per-document loop
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if _varlen_kernel_applies(query, dropout):
        max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        out = varlen_attn(
            query[0].transpose(0, 1),  # (L, H, d)
            key[0].transpose(0, 1),  # (L, H_kv, d)
            value[0].transpose(0, 1),
            cu.to(device=query.device, dtype=torch.int32),
            cu.to(device=query.device, dtype=torch.int32),
            max_len,
            max_len,
            scale=scaling,
            window_size=(-1, 0) if causal else (-1, -1),
            enable_gqa=kv_heads != heads,
        )  # (L, H, d)
        return out[None], None
    # split, not slicing: the backward of a split is one concatenation, while each slice's backward writes its
    # gradient into a zero tensor of the whole row (D x L work for D documents: about 16 % of a joint CPU demo step)
    lengths = torch.diff(cu).tolist()
    outs = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=kv_heads != heads
        )  # (1, H, s_d, d)
        for q, k, v in zip(
            query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
        )
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None  # (1, L, H, d)


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function of the ``varlen`` backend: none for unpadded rows (packed or not), transformers' sdpa mask
    when a padding mask is given."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, varlen_mask)
