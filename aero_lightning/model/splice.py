"""Put projected audio into the ``<|AUDIO|>`` slots of the LLM's input embeddings.

The prompt of a sample holds one ``<|AUDIO|>`` token per projected audio embedding (Qwen2-Audio's convention), and
the embeddings of all clips of a batch arrive concatenated in slot order: clip by clip, window by window, frame by
frame. Splicing is then a masked scatter in row-major order, the same for a padded batch ``(B, L)`` and a packed
row ``(1, L)``.
"""

from __future__ import annotations

import torch

__all__ = ["splice_audio"]


def splice_audio(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, audio_embeds: torch.Tensor, audio_token_id: int
) -> torch.Tensor:
    """Replace the embeddings at the ``<|AUDIO|>`` positions by the projected audio, in order.

    Args:
        inputs_embeds: ``(B, L, D)`` token embeddings of ``input_ids``.
        input_ids: ``(B, L)`` token ids.
        audio_embeds: ``(N, D)`` projected audio of every clip in slot order; cast to ``inputs_embeds.dtype``.
        audio_token_id: id of ``<|AUDIO|>``.

    Returns:
        ``(B, L, D)``: ``inputs_embeds`` with row-major slot ``i`` holding ``audio_embeds[i]`` (a new tensor; the
        gradient reaches both inputs).

    Raises:
        ValueError: if ``input_ids`` holds a number of ``<|AUDIO|>`` slots other than ``N``, or the widths differ.
    """
    slots = input_ids == audio_token_id  # (B, L)
    num_slots = int(slots.sum())
    if audio_embeds.shape[0] != num_slots:
        raise ValueError(
            f"audio/slot count mismatch: {audio_embeds.shape[0]} audio embeddings for {num_slots} <|AUDIO|> slots "
            "in input_ids; build the prompt with the model's audio token counter "
            "(aero_lightning.data.audio_tokens.AudioTokenCounter) so each clip gets one slot per embedding"
        )
    if audio_embeds.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(
            f"audio embeddings are {audio_embeds.shape[-1]} wide but the LLM's are {inputs_embeds.shape[-1]}"
        )
    audio = audio_embeds.to(inputs_embeds.dtype)  # (N, D)
    return inputs_embeds.masked_scatter(slots[..., None].to(inputs_embeds.device), audio)  # (B, L, D)
