"""Estimates for ``experiment=librispeech_1gpu``: tokens, time and memory per optimizer step, from the FLOP model.

Nothing here has been measured: the step time assumes an MFU, the memory a rule of thumb for activations. The
run's TensorBoard (``perf/tokens_per_s``, ``perf/mfu``, ``perf/mfu_llm``, ``perf/peak_mem_gib``) replaces them.

The model is built on the meta device at the real shapes (Whisper-small's encoder, Qwen2.5-0.5B, AvgPool(2) +
Linear), so :func:`aero_lightning.model.flops.count_params` counts its real matmul weights; a step is
``accumulate`` packed rows of LibriSpeech-shaped documents, and :func:`aero_lightning.model.flops.step_flops` gives
its FLOPs in both conventions (whole model, and lmms-engine's LLM-only count).

    python experiments/librispeech_1gpu/estimate.py     # prints the table of experiments/librispeech_1gpu/README.md
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.model.encoders import PaddingFreeWhisperEncoder, WhisperAudioEncoder
from aero_lightning.model.flops import PEAK_FLOPS_BF16, count_params, step_flops
from aero_lightning.model.projector import AvgPoolProjector
from aero_lightning.model.tiny import tiny_whisper_config

WHISPER_SMALL = {"num_mel_bins": 80, "d_model": 768, "layers": 12, "heads": 12, "ffn_dim": 3072}
"""openai/whisper-small's encoder (``tiny_whisper_config`` arguments)."""

QWEN2_5_0_5B = {
    "vocab_size": 151_936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32_768,
    "tie_word_embeddings": True,
}
"""Qwen/Qwen2.5-0.5B-Instruct's architecture (its config.json)."""

UTTERANCE_S = 12.3
"""Mean LibriSpeech 960 h utterance: 960 h over 281 241 utterances."""
TEXT_TOKENS = 90
"""LLM text tokens per utterance, assumed: Qwen's default system prompt and chat markup (~30), the instruction
(~12), the audio delimiters (2) and the reply (~34 words of upper-case text, ~46 tokens with ``<|im_end|>``)."""
TARGET_TOKENS = 46
"""Loss positions per utterance (the reply and its ``<|im_end|>``), part of :data:`TEXT_TOKENS`."""
CORPUS_S = 960 * 3600
"""LibriSpeech's training audio, seconds."""


def _model():
    """The architecture on the meta device, as ``count_params`` reads it (every weight trainable)."""
    with torch.device("meta"):
        whisper = PaddingFreeWhisperEncoder(tiny_whisper_config(**WHISPER_SMALL))
        llm = Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_0_5B))
        encoder = WhisperAudioEncoder(whisper)
        projector = AvgPoolProjector(encoder_dim=768, llm_dim=896, pool=2)
    return SimpleNamespace(encoder=encoder, projector=projector, llm=llm)


def activation_bytes_per_token(h: int, ffn: int, layers: int, swiglu: bool, checkpointing: bool) -> float:
    """Activation memory kept for the backward pass, bytes per token (bf16), rule of thumb.

    Without recomputation, a transformer layer keeps about ``4h`` bytes for its two norms, ``11h`` for attention
    with a fused (flash) kernel, and its FFN's inputs and intermediates: ``2h + 8·ffn`` for SwiGLU (input, gate,
    up, activation, product), ``2h + 6·ffn`` for a GELU MLP (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", arXiv:2205.05198, Table 2, without dropout masks). With activation
    checkpointing only each layer's ``2h``-byte input is kept (plus one layer's full set during its recompute,
    added by the caller).
    """
    if checkpointing:
        return 2.0 * h * layers
    ffn_bytes = 2 * h + (8 if swiglu else 6) * ffn
    return float((4 * h + 11 * h + ffn_bytes) * layers)


def estimate(
    packing_length: int = 16_384,
    accumulate: int = 2,
    mfu: float = 0.30,
    peak_flops: float = PEAK_FLOPS_BF16["H100"],
    gradient_checkpointing: bool = False,
    max_steps: int = 12_000,
) -> dict[str, float]:
    """Tokens, FLOPs, time and memory of one optimizer step of ``experiment=librispeech_1gpu``.

    Args:
        packing_length: tokens per packed row (``data.packing.packing_length``).
        accumulate: rows per optimizer step (``trainer.accumulate_grad_batches``).
        mfu: assumed hardware FLOPs utilisation; without activation checkpointing it is the ``perf/mfu`` the run
            logs (whole-model convention), with it ``perf/mfu`` is 3/4 of it (the recomputed forward is work the
            model FLOPs do not count).
        peak_flops: dense bf16 peak of the GPU, FLOP/s (H100 SXM: 989e12).
        gradient_checkpointing: ``model.gradient_checkpointing``.
        max_steps: ``trainer.max_steps``.

    Returns:
        ``docs_per_row``, ``tokens_per_step`` (real LLM tokens), ``audio_s_per_step``, ``flops_per_step`` (whole
        model), ``lmms_flops_per_step``, ``step_s``, ``tokens_per_s``, ``audio_s_per_s``, ``mfu`` and ``mfu_llm``
        (the speed in the whole-model and lmms-engine conventions), ``steps_per_epoch``, ``epoch_h``, ``run_h``
        (``max_steps``), ``params`` (all weights), ``state_gib`` (weights, gradients, AdamW), ``activation_gib``,
        ``memory_gib``; seconds, hours and GiB (2**30 bytes).
    """
    model = _model()
    params = count_params(model)
    counter = AudioTokenCounter(projector_downsample=2)
    samples = round(UTTERANCE_S * 16_000)
    audio_tokens = counter(samples)
    frames = int(counter.encoder_frames(samples))
    doc = audio_tokens + TEXT_TOKENS
    docs_per_row = packing_length // doc
    docs = docs_per_row * accumulate
    flops = step_flops(params, [frames] * docs, [doc] * docs, target_tokens=TARGET_TOKENS * docs)
    # recomputing every layer's forward adds a third to the hardware FLOPs; model FLOPs (and MFU) exclude it
    step_s = flops["total"] * (4 / 3 if gradient_checkpointing else 1.0) / (mfu * peak_flops)
    n_params = sum(p.numel() for p in (*model.encoder.parameters(), *model.projector.parameters()))
    n_params += sum(p.numel() for p in model.llm.parameters())
    state = 16 * n_params  # fp32 weights 4 + fp32 gradients 4 + AdamW moments 8 bytes per weight
    llm_cfg, enc = QWEN2_5_0_5B, WHISPER_SMALL
    llm_per_token = activation_bytes_per_token(
        llm_cfg["hidden_size"], llm_cfg["intermediate_size"], llm_cfg["num_hidden_layers"], True,
        gradient_checkpointing,
    )  # fmt: skip
    enc_per_frame = activation_bytes_per_token(
        enc["d_model"], enc["ffn_dim"], enc["layers"], False, gradient_checkpointing
    )
    row_tokens, row_frames = docs_per_row * doc, docs_per_row * frames
    activations = llm_per_token * row_tokens + enc_per_frame * row_frames  # one row at a time
    if gradient_checkpointing:  # the layer being recomputed holds its full set
        activations += (
            activation_bytes_per_token(llm_cfg["hidden_size"], llm_cfg["intermediate_size"], 1, True, False)
            * row_tokens
        )
    audio_s = docs * UTTERANCE_S
    return {
        "docs_per_row": docs_per_row,
        "tokens_per_step": docs * doc,
        "audio_s_per_step": audio_s,
        "flops_per_step": flops["total"],
        "lmms_flops_per_step": flops["lmms_engine"],
        "step_s": step_s,
        "tokens_per_s": docs * doc / step_s,
        "audio_s_per_s": audio_s / step_s,
        "mfu": flops["total"] / (step_s * peak_flops),
        "mfu_llm": flops["lmms_engine"] / (step_s * peak_flops),
        "steps_per_epoch": math.ceil(CORPUS_S / audio_s),
        "epoch_h": math.ceil(CORPUS_S / audio_s) * step_s / 3600,
        "run_h": max_steps * step_s / 3600,
        "params": n_params,
        "state_gib": state / 2**30,
        "activation_gib": activations / 2**30,
        "memory_gib": (state + activations) / 2**30,
    }


def table() -> str:
    """The markdown table of the README: the recipe as configured, and with activation checkpointing, both at a
    hardware utilisation of 0.30 of an H100 SXM's dense bf16 peak."""
    rows = [
        "| setting | tokens / step | audio s / step | step time (s) | tokens/s | audio s/s | `perf/mfu` | "
        "`perf/mfu_llm` | one pass over 960 h | 12 000 steps | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, ckpt in (
        ("estimate, as configured", False),
        ("estimate, `model.gradient_checkpointing=true`", True),
    ):
        e = estimate(gradient_checkpointing=ckpt)
        rows.append(
            f"| {label} | {e['tokens_per_step']:,} | {e['audio_s_per_step']:,.0f} | {e['step_s']:.2f} | "
            f"{e['tokens_per_s']:,.0f} | {e['audio_s_per_s']:,.0f} | {e['mfu']:.3f} | {e['mfu_llm']:.2f} | "
            f"{e['steps_per_epoch']:,} steps, {e['epoch_h']:.2f} h | {e['run_h']:.1f} h | {e['memory_gib']:.0f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    e = estimate()
    print(
        f"{e['params'] / 1e6:.0f} M weights; {e['docs_per_row']} utterances of {UTTERANCE_S} s per "
        f"{16_384}-token row; {e['flops_per_step']:.3e} FLOPs per step (whole model), "
        f"{e['lmms_flops_per_step']:.3e} (lmms-engine)"
    )
    print(table())
