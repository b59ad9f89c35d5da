"""Model FLOPs and MFU (model FLOPs utilisation) of an :class:`~aero_lightning.model.aero.AeroModel`.

``MFU = achieved model FLOP/s / peak FLOP/s``. *Model* FLOPs are what the model mathematically needs for
the real tokens of a step, independent of how the implementation computes them: padding, activation
recomputation (gradient checkpointing, the loss's chunk recomputation) and kernels that skip masked blocks change
the hardware FLOPs, never the model FLOPs.

Two conventions are computed (one optimizer step; all counts in FLOPs, one multiply-add = 2 FLOPs):

1. **Whole model** (``step_flops(...)["total"]``, logged as ``perf/mfu``): encoder, projector and LLM, trainable
   and frozen weights apart, the LM head only where the loss projects, as described below. It is the work this
   model really needs.
2. **LLM text FLOPs as lmms-engine counts them** (``step_flops(...)["lmms_engine"]``, logged as ``perf/mfu_llm``),
   so that MFU compares with Aero's published figures (Aero-1-Audio was trained with lmms-engine). Source:
   lmms-engine ``src/lmms_engine/models/utils.py``, ``FlopsCounter._estimate_qwen2_flops``
   (https://github.com/EvolvingLMMs-Lab/lmms-engine; the counter is verl's ``verl/utils/flops_counter.py``)::

       F_lmms = 6 * N_lmms * sum_i s_i + 12 * sum_i s_i**2 * head_dim * H * L
       N_lmms = L * (3 * h * I + h * (q + k + v + o)) + 2 * V * h

   from the LLM config only (hidden ``h``, FFN ``I``, ``L`` layers, ``H`` query heads, ``q = o = H * head_dim``,
   ``k = v = H_kv * head_dim``, vocabulary ``V``): every weight counted as trainable, the input embedding counted as
   a matmul and the LM head at every token (``2 * V * h``), the audio encoder and the projector not counted at
   all; ``s_i`` are the real LLM tokens of each sequence (lmms-engine takes attention-mask row sums, one document
   per row; here the documents of a packed row count one by one, as they attend), audio positions included. At
   Aero's shapes (Whisper-large-v3 + Qwen2.5-1.5B) it is about 1.4x below the whole-model count: the 635 M-weight
   encoder runs 50 frames per second of audio against the LLM's 25 tokens.

**Parameter term** of the whole-model count (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
arXiv:2001.08361, §2.1: forward ``2N`` per token, backward twice the forward, so ``6N`` per token for training).
For each of encoder, projector and LLM::

    F_params = (6 * N_trainable + 2 * N_frozen) * tokens

- ``N`` counts **matmul weights** only: the ``weight`` of every ``nn.Linear`` (LoRA adapters included, they
  are Linears) plus the conv stem (below). Biases, norm scales and activations cost O(d) per token, not
  O(d²) (about 1/d of the matmuls: < 0.1 % at Whisper-large / Qwen2.5 widths), and are left out, as is
  every ``nn.Embedding``: the LLM's input embedding and Whisper's positional table are lookups, not
  matmuls. Sizes are whole-parameter sizes also when a process holds a shard (:func:`full_numel`).
- The **LM head** (``V * d`` weights, whether or not tied to the input embedding: tying shares the storage, not
  the computation) is applied only to the **target positions** of the step, ``(6 or 2) * V * d`` FLOPs each:
  the training loss (:func:`~aero_lightning.model.liger.linear_cross_entropy_sum`) projects only positions
  that carry a label (the reply tokens of an ASR sample), never the audio and prompt positions, which are most
  of the row. Target positions are ``labels[:, 1:] != -100``, the count the loss uses (:func:`batch_targets`);
  without a count (``target_tokens=None``) every real token is projected, as a forward that returns full logits
  does.
- A weight is trainable when its ``requires_grad`` is True (``AeroModel.apply_freeze``). Frozen weights
  cost the forward only, ``2N`` (no backward pass runs through them). This is a lower bound: a frozen component
  *above* a trainable one (the LLM when only the projector trains, or frozen LoRA base weights) still
  back-propagates activation gradients, ``4N`` in reality, so MFU is conservative for such runs.
  Conversely ``6N`` for a trainable first layer (conv1, whose mel input needs no gradient) over-counts by
  ``2N``; PaLM and Kaplan ignore both.
- **Encoder**: ``tokens`` = encoder frames after the conv stem (50 Hz for Whisper), summed over windows.
  The conv stem is counted explicitly from its shapes: a ``Conv1d`` costs ``2 * weight.numel()`` FLOPs
  (``C_out * C_in/groups * k`` multiply-adds) per *output position*; Whisper's conv1 (stride 1) has
  ``stride(conv2) = 2`` output positions per encoder frame and conv2 (stride 2) has one, so the stem adds
  ``(n_mels*d*3)*2 + (d*d*3)*1`` matmul-weight equivalents per encoder frame
  (:attr:`ComponentParams.stem_trainable` / ``stem_frozen``). conv1 really runs on ``mel_frames(samples)``
  mel frames, which is ``2 * frames`` or one less, so the stem is over-counted by at most one conv1 output
  position per window (none for a full 30 s window). The optional CTC head (a Linear on encoder frames)
  is counted with the encoder.
- **Projector**: ``tokens`` = projector **output** tokens, ``sum over windows of projected_tokens(frames, k)``
  (:mod:`aero_lightning.data.audio_tokens`), which equal the ``<|AUDIO|>`` slots the LLM receives. Both
  projectors apply all their Linears after the frames are grouped (``mlp_stack``: fc1 sees ``k`` stacked frames,
  ``k*D_enc`` wide, once per output token; ``avgpool_linear``: the Linear sees one pooled frame per output token),
  so output tokens, not input frames, is the number of times each weight is applied. A zero-padded final group
  still goes through the Linears and is counted.
- **LLM**: ``tokens`` = real tokens (``attention_mask`` ones of a padded batch; every position of a packed
  row), audio and text alike; padding never counts. The LM head: target positions, above.

**Attention term** (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, appendix B: ``6N + 12·L·H·Q·T`` FLOPs
per token). Per layer and per sequence of ``s`` tokens with ``H`` query heads of size ``Q``, the forward
computes ``Q·K^T`` (``s·s·H·Q`` multiply-adds = ``2·s²·H·Q`` FLOPs) and ``A·V`` (another ``2·s²·H·Q``):
``4·s²·d`` FLOPs with ``d = H·Q``. The backward costs twice the forward, so fwd+bwd is ``12·s²·d`` —
PaLM's per-token ``12·L·H·Q·T`` times ``T`` tokens. Attention never crosses a document (a packed LLM
document or a 30 s encoder window), so the cost is a sum over documents::

    F_attn = (12 * L_trainable + 4 * L_frozen) * d * sum_i s_i**2

- ``s_i``: encoder frames per window for the encoder, real tokens per document for the LLM; ``Σ sᵢ²``,
  not ``(Σ sᵢ)²``.
- ``d = H·Q`` is the query width (``d_model`` for Whisper; ``num_attention_heads * head_dim``, which is
  ``hidden_size`` for Qwen2/2.5); grouped-query attention does not reduce it, since every query head still
  attends to every key.
- A layer counts as trainable (12) when any parameter of its block (``...layers.<i>.``) requires grad,
  else as forward only (4, a third of 12). The projector has no attention.
- **Causal masks are not halved**: the causal LLM and the bidirectional encoder use the same ``s²``
  formula, as PaLM (and lmms-engine) do. A causal kernel that skips masked blocks (FlashAttention) does about half
  of this work, so the LLM attention term is an upper bound on the useful work; keeping PaLM's convention makes
  the numbers comparable with published MFU.
- Softmax, RoPE, norms and the embedding lookup are not counted.

FLOPs are additive over documents, so the lengths of all micro-batches of a step (gradient accumulation)
can be concatenated, or the per-micro-batch results summed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.model.liger import IGNORE_INDEX

if TYPE_CHECKING:
    from aero_lightning.model.aero import AeroModel

# Dense (no 2:4 sparsity) bf16 Tensor Core peak per GPU, FLOP/s. NVIDIA datasheets quote the "with sparsity"
# figure; dense is half of it. fp16 has the same peak on all of these.
PEAK_FLOPS_BF16: dict[str, float] = {
    # NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/): BF16
    # 1,979 TFLOPS SXM, 1,513 PCIe, 1,671 NVL, with sparsity. torch reports SXM as "NVIDIA H100 80GB HBM3".
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    # NVIDIA H200 datasheet (https://www.nvidia.com/en-us/data-center/h200/): BF16 1,979 TFLOPS with sparsity
    # (same Hopper die as H100 SXM); GH200 Grace Hopper datasheet: the same 1,979 TFLOPS.
    "H200": 989e12,
    "GH200": 989e12,
    # NVIDIA A100 datasheet (https://www.nvidia.com/en-us/data-center/a100/): BF16 312 TFLOPS dense,
    # 624 sparse (SXM4 and PCIe alike).
    "A100": 312e12,
    # NVIDIA L40S datasheet (https://www.nvidia.com/en-us/data-center/l40s/): BF16 733 TFLOPS with sparsity.
    "L40S": 362e12,
    # NVIDIA HGX B200 / DGX B200 datasheet (https://www.nvidia.com/en-us/data-center/hgx/): FP16/BF16
    # 4.5 PFLOPS per GPU with sparsity; GB200 NVL72 datasheet
    # (https://www.nvidia.com/en-us/data-center/gb200-nvl72/): 5 PFLOPS per GPU with sparsity (1,200 W part).
    "B200": 2.25e15,
    "GB200": 2.5e15,
}

_HALF_PRECISIONS = {"bf16", "bfloat16", "16", "fp16", "float16", "half"}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def peak_flops(
    device_name: str, dtype: torch.dtype | str = torch.bfloat16, override: float | None = None
) -> float | None:
    """Dense peak FLOP/s of one device for half-precision (bf16/fp16) matmuls.

    Args:
        device_name: ``torch.cuda.get_device_name()`` (``"NVIDIA H100 80GB HBM3"``) or ``"cpu"``; matched
            case-insensitively against the keys of :data:`PEAK_FLOPS_BF16`, the longest matching key wins
            (``"H100 PCIe"`` before ``"H100"``).
        dtype: compute precision, a ``torch.dtype`` or a Lightning precision string (``"bf16-mixed"``,
            ``"16-mixed"``, ``"bf16-true"``). Only bf16/fp16 have table entries.
        override: peak FLOP/s from the config; when given (> 0) it is returned as is, for any device and
            dtype.

    Returns:
        Peak FLOP/s per device, or None for a CPU, an unknown GPU or a precision without an entry (fp32, tf32,
        fp8): callers then log no MFU.

    Raises:
        ValueError: if ``override`` is given but not positive.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be > 0, got {override}")
        return float(override)
    if isinstance(dtype, torch.dtype):
        half = dtype in (torch.bfloat16, torch.float16)
    else:
        half = str(dtype).lower().split("-")[0] in _HALF_PRECISIONS
    if not half:
        return None
    name = device_name.lower()
    matches = [key for key in PEAK_FLOPS_BF16 if key.lower() in name]
    if not matches:
        return None
    return PEAK_FLOPS_BF16[max(matches, key=len)]


def mfu(flops_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation, ``flops_per_s / peak`` (a fraction, 0.34 = 34 %).

    Both must cover the same devices: per-device achieved FLOP/s over one device's peak, or the global FLOP/s
    over ``world_size * peak``.

    Args:
        flops_per_s: achieved model FLOP/s (:func:`step_flops` total / step wall time).
        peak: peak FLOP/s (:func:`peak_flops`).

    Raises:
        ValueError: if ``peak`` is not positive.
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak}")
    return flops_per_s / peak


@dataclass(frozen=True)
class ComponentParams:
    """Matmul-weight counts of one component, split by ``requires_grad``.

    Attributes:
        trainable: ``nn.Linear`` weights (elements) with ``requires_grad``; each is applied once per token.
        frozen: ``nn.Linear`` weights without ``requires_grad``.
        stem_trainable: conv-stem weights weighted by their output positions per token (Whisper: conv1
            weights x 2 + conv2 weights x 1), trainable; ``2 * stem`` FLOPs per token forward.
        stem_frozen: the same, frozen.
        trainable_layers: attention layers whose block has a trainable parameter (fwd+bwd attention).
        frozen_layers: attention layers with no trainable parameter (forward-only attention).
        attn_width: query width ``d = heads * head_dim`` of the attention (0 without attention).
        head_trainable: LM-head weights (``V * d``, LLM only) with ``requires_grad``, applied once per target
            position (not in ``trainable``).
        head_frozen: the same, frozen.
    """

    trainable: int = 0
    frozen: int = 0
    stem_trainable: int = 0
    stem_frozen: int = 0
    trainable_layers: int = 0
    frozen_layers: int = 0
    attn_width: int = 0
    head_trainable: int = 0
    head_frozen: int = 0

    @property
    def layers(self) -> int:
        """Attention layers."""
        return self.trainable_layers + self.frozen_layers

    def param_flops(self, tokens: int) -> int:
        """``(6 * N_trainable + 2 * N_frozen) * tokens`` FLOPs, conv stem included, LM head excluded."""
        return (6 * (self.trainable + self.stem_trainable) + 2 * (self.frozen + self.stem_frozen)) * tokens

    def head_flops(self, target_tokens: int) -> int:
        """``(6 * V·d trainable + 2 * V·d frozen) * target_tokens`` FLOPs of the LM head."""
        return (6 * self.head_trainable + 2 * self.head_frozen) * target_tokens

    def attention_flops(self, sum_sq: int) -> int:
        """``(12 * L_trainable + 4 * L_frozen) * d * sum_sq`` FLOPs, ``sum_sq = Σ sᵢ²`` over documents."""
        return (12 * self.trainable_layers + 4 * self.frozen_layers) * self.attn_width * sum_sq


@dataclass(frozen=True)
class ModelParams:
    """What :func:`step_flops` needs to know about a model (from :func:`count_params`).

    Attributes:
        encoder: encoder counts (conv stem, layers, CTC head if any); tokens = encoder frames.
        projector: projector counts; tokens = projector output tokens.
        llm: LLM counts (input embedding excluded; the LM head apart, in ``head_trainable``/``head_frozen``);
            tokens = real LLM tokens, the head's tokens = target positions.
        projector_downsample: encoder frames per projector output token ``k``.
        lmms_engine: lmms-engine's LLM counts from the LLM config (:class:`LmmsEngineParams`).
    """

    encoder: ComponentParams
    projector: ComponentParams
    llm: ComponentParams
    projector_downsample: int
    lmms_engine: LmmsEngineParams


@dataclass(frozen=True)
class LmmsEngineParams:
    """The LLM figures lmms-engine's ``FlopsCounter._estimate_qwen2_flops`` reads from the LLM config.

    Attributes:
        dense: ``N_lmms = L * (3*h*I + h*(q + k + v + o)) + 2*V*h`` weights (module docstring).
        attn: ``head_dim * H * L``, the factor of ``12 * Σ sᵢ²`` in its attention term.
    """

    dense: int = 0
    attn: int = 0

    def flops(self, doc_lengths: Sequence[int]) -> int:
        """``6 * dense * Σ sᵢ + 12 * attn * Σ sᵢ²`` FLOPs."""
        return 6 * self.dense * sum(doc_lengths) + 12 * self.attn * sum(s * s for s in doc_lengths)


def lmms_engine_params(llm_config) -> LmmsEngineParams:
    """:class:`LmmsEngineParams` of an HF Qwen2 / Llama-style config (``get_text_config()`` of the LLM).

    Args:
        llm_config: with ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``vocab_size`` and optionally ``head_dim``.
    """
    h, inter, layers = llm_config.hidden_size, llm_config.intermediate_size, llm_config.num_hidden_layers
    heads, kv_heads = llm_config.num_attention_heads, llm_config.num_key_value_heads
    head_dim = getattr(llm_config, "head_dim", None) or h // heads
    q = o = heads * head_dim
    k = v = kv_heads * head_dim
    dense = layers * (3 * h * inter + h * (q + k + v + o)) + 2 * llm_config.vocab_size * h
    return LmmsEngineParams(dense=dense, attn=head_dim * heads * layers)


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also when this process holds only a part of it.

    DeepSpeed ZeRO-3 replaces a partitioned parameter's ``data`` by an empty tensor (``numel() == 0`` outside
    its module's forward) and records the full size as ``ds_numel``; an FSDP2 ``DTensor`` reports its global shape,
    so its ``numel()`` is already the full size (the local shard is ``to_local()``).
    """
    ds_numel = getattr(param, "ds_numel", None)
    return int(ds_numel) if ds_numel is not None else param.numel()


def _linear_weights(module: nn.Module, skip: nn.Module | None = None) -> tuple[int, int]:
    trainable = frozen = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and m is not skip:
            n = full_numel(m.weight)
            if m.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    return trainable, frozen


def _conv_stem(module: nn.Module) -> tuple[int, int]:
    """Conv1d weights weighted by output positions per final-conv output frame.

    The ``Conv1d`` modules are taken as a sequential stem in registration order (Whisper: conv1, conv2): conv
    ``i`` produces ``prod(stride of later convs)`` positions per output frame of the last one.
    """
    convs = [m for m in module.modules() if isinstance(m, nn.Conv1d)]
    trainable = frozen = 0
    for i, conv in enumerate(convs):
        positions = 1
        for later in convs[i + 1 :]:
            positions *= later.stride[0]
        n = full_numel(conv.weight) * positions
        if conv.weight.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen


def _layer_status(module: nn.Module, expected: int, what: str) -> tuple[int, int]:
    """(trainable, frozen) transformer blocks, from parameter names ``...layers.<i>....``."""
    trained: dict[int, bool] = {}
    for name, param in module.named_parameters():
        match = _LAYER_RE.search(name)
        if match:
            i = int(match.group(1))
            trained[i] = trained.get(i, False) or param.requires_grad
    if len(trained) != expected:
        raise ValueError(
            f"{what}: found {len(trained)} blocks named '...layers.<i>.' but the config has {expected} "
            "layers; flops.count_params does not know this architecture"
        )
    n_trained = sum(trained.values())
    return n_trained, expected - n_trained


def count_params(model: AeroModel) -> ModelParams:
    """Matmul-weight counts, attention layers and widths of an AeroModel, respecting ``requires_grad``.

    Call it again after changing what is frozen. Sizes are those of the whole parameters (:func:`full_numel`), so
    the counts are the same under DeepSpeed ZeRO-3 and FSDP2, which hold only a partition per process.

    Args:
        model: the model (encoder: Whisper architecture; LLM: an HF causal LM whose blocks are named
            ``...layers.<i>.``, e.g. Qwen2).

    Returns:
        :class:`ModelParams`.

    Raises:
        ValueError: if the layer blocks cannot be matched to the configs' layer counts.
    """
    enc_cfg = model.encoder.config
    enc_t, enc_f = _linear_weights(model.encoder)
    ctc = getattr(model, "ctc_head", None)
    if ctc is not None:  # applied once per encoder frame
        ctc_t, ctc_f = _linear_weights(ctc)
        enc_t, enc_f = enc_t + ctc_t, enc_f + ctc_f
    stem_t, stem_f = _conv_stem(model.encoder)
    enc_lt, enc_lf = _layer_status(model.encoder, enc_cfg.encoder_layers, "encoder")
    encoder = ComponentParams(enc_t, enc_f, stem_t, stem_f, enc_lt, enc_lf, attn_width=enc_cfg.d_model)

    proj_t, proj_f = _linear_weights(model.projector)
    projector = ComponentParams(proj_t, proj_f)

    llm_cfg = model.llm.config.get_text_config()
    head_dim = getattr(llm_cfg, "head_dim", None) or llm_cfg.hidden_size // llm_cfg.num_attention_heads
    head = model.llm.get_output_embeddings()
    llm_t, llm_f = _linear_weights(model.llm, skip=head)  # the head is applied at target positions only
    head_t = head_f = 0
    if head is not None:
        if head.weight.requires_grad:
            head_t = full_numel(head.weight)
        else:
            head_f = full_numel(head.weight)
    llm_lt, llm_lf = _layer_status(model.llm, llm_cfg.num_hidden_layers, "llm")
    llm = ComponentParams(
        llm_t,
        llm_f,
        0,
        0,
        llm_lt,
        llm_lf,
        attn_width=llm_cfg.num_attention_heads * head_dim,
        head_trainable=head_t,
        head_frozen=head_f,
    )
    return ModelParams(
        encoder,
        projector,
        llm,
        projector_downsample=int(model.projector.downsample),
        lmms_engine=lmms_engine_params(llm_cfg),
    )


def _ints(lengths: Sequence[int] | torch.Tensor, what: str) -> list[int]:
    values = (
        lengths.detach().reshape(-1).cpu().tolist()
        if isinstance(lengths, torch.Tensor)
        else [int(x) for x in lengths]
    )
    if any(v < 0 for v in values):
        raise ValueError(f"{what} must be >= 0, got {values}")
    return [int(v) for v in values]


def step_flops(
    params: ModelParams,
    encoder_window_frames: Sequence[int] | torch.Tensor,
    llm_doc_lengths: Sequence[int] | torch.Tensor,
    target_tokens: int | None = None,
) -> dict[str, int]:
    """Model FLOPs of one training step over the given real lengths, in both conventions (module docstring).

    Args:
        params: :func:`count_params` of the model.
        encoder_window_frames: encoder frames (after the conv stem) of every 30 s window of the step; empty
            for text-only batches.
        llm_doc_lengths: real tokens of every LLM document of the step (padding excluded).
        target_tokens: positions the loss projects to the vocabulary (:func:`batch_targets`); None: every real
            LLM token (a forward that returns full logits).

    Returns:
        FLOPs (exact integers). Whole model: ``encoder``, ``projector``, ``llm`` (each with its attention; the LLM
        with its LM head) and their sum ``total``; ``encoder_attention``, ``llm_attention`` and ``llm_head`` are
        parts already inside ``encoder`` and ``llm``. LLM only, as lmms-engine counts: ``lmms_engine``.

    Raises:
        ValueError: on a negative length or target count, or more targets than LLM tokens.
    """
    frames = _ints(encoder_window_frames, "encoder_window_frames")
    docs = _ints(llm_doc_lengths, "llm_doc_lengths")
    targets = sum(docs) if target_tokens is None else int(target_tokens)
    if not 0 <= targets <= sum(docs):
        raise ValueError(f"target_tokens must be in [0, {sum(docs)}] (the LLM tokens), got {targets}")
    k = params.projector_downsample
    enc_attn = params.encoder.attention_flops(sum(s * s for s in frames))
    llm_attn = params.llm.attention_flops(sum(s * s for s in docs))
    llm_head = params.llm.head_flops(targets)
    encoder = params.encoder.param_flops(sum(frames)) + enc_attn
    projector = params.projector.param_flops(sum(-(-s // k) for s in frames))
    llm = params.llm.param_flops(sum(docs)) + llm_attn + llm_head
    return {
        "encoder": encoder,
        "projector": projector,
        "llm": llm,
        "total": encoder + projector + llm,
        "encoder_attention": enc_attn,
        "llm_attention": llm_attn,
        "llm_head": llm_head,
        "lmms_engine": params.lmms_engine.flops(docs),
    }


def batch_targets(batch: Mapping[str, object]) -> int:
    """Positions of a collated batch that the training loss projects to the vocabulary.

    The loss predicts ``labels[:, 1:]`` from the hidden states ``[:, :-1]`` and keeps the labels that are not -100
    (:meth:`~aero_lightning.model.aero.AeroModel.forward`), so this is its ``num_target_tokens``. A packed row's
    shift runs across document boundaries, where the first label of a document is -100 (prompt), as in the loss.
    A tensor on a GPU is summed there and copied to the host (a synchronisation).

    Args:
        batch: a batch with ``labels`` ``(B, L)``; without ``labels`` (generation), 0.
    """
    labels = batch.get("labels")
    if labels is None:
        return 0
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def batch_lengths(
    batch: Mapping[str, object], counter: AudioTokenCounter | None = None
) -> tuple[list[int], list[int]]:
    """Real encoder-window frames and LLM document lengths of a collated batch.

    Packed batches give them directly (``encoder_cu_seqlens``, ``cu_seqlens``); padded batches through
    ``window_lengths`` (:meth:`~aero_lightning.data.audio_tokens.AudioTokenCounter.encoder_frames`) and ``attention_mask`` row
    sums. A batch with neither ``cu_seqlens`` nor ``attention_mask`` counts every ``input_ids`` row in full.
    Tensors on a GPU are copied to the host (a synchronisation).

    Args:
        batch: a batch of :func:`~aero_lightning.data.packing.collate_packed` or ``collate_padded``.
        counter: the model's ``audio_token_counter()``; default Whisper's (hop 160 samples, conv stride 2).

    Returns:
        ``(encoder_window_frames, llm_doc_lengths)`` lists of ints (the encoder list is empty without audio).
    """
    if batch.get("cu_seqlens") is not None:
        docs = torch.diff(batch["cu_seqlens"].reshape(-1)).tolist()
    elif batch.get("attention_mask") is not None:
        docs = batch["attention_mask"].sum(dim=-1).reshape(-1).tolist()
    else:
        rows, length = batch["input_ids"].shape
        docs = [length] * rows
    if batch.get("encoder_cu_seqlens") is not None:
        frames = torch.diff(batch["encoder_cu_seqlens"].reshape(-1)).tolist()
    elif batch.get("window_lengths") is not None:
        frames = (counter or AudioTokenCounter()).encoder_frames(batch["window_lengths"]).tolist()
    else:
        frames = []
    return [int(f) for f in frames], [int(d) for d in docs]
