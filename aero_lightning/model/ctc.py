"""Per-document CTC between encoder frames and the reply tokens (hybrid CTC/attention training).

A linear head on the encoder frames (50 Hz) is trained with CTC (Graves et al. 2006, "Connectionist Temporal
Classification", https://www.cs.toronto.edu/~graves/icml_2006.pdf) towards each document's reply tokens, next to
the LLM's cross-entropy: hybrid CTC/attention training (Watanabe et al. 2017,
https://doi.org/10.1109/JSTSP.2017.2763455). It lets an encoder trained from scratch (the CPU demo) learn the
acoustics in minutes, and it is the whole loss of encoder pre-training (``model.ctc_only``).

The term is returned as a sum over documents with its target count, so that the training loop normalises it over
the global batch like the LM loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aero_lightning.data.chat import ctc_target_mask
from aero_lightning.data.packing import batch_documents

__all__ = ["ctc_loss_sum", "ctc_target_mask"]


def ctc_loss_sum(
    frame_logits: torch.Tensor,
    frame_lengths: torch.Tensor,
    tokens_per_window: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    audio_token_id: int,
    end_of_turn_id: int,
    blank_id: int,
    cu_seqlens: torch.Tensor | None = None,
    documents: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC of every document's encoder frames against its reply tokens, summed over documents.

    The windows arrive in document order (as the collators build them), so each document's windows are found by
    walking them until its ``<|AUDIO|>`` slot count is reached. Documents without audio or without CTC targets
    (text-only samples) contribute nothing.

    Args:
        frame_logits: ``(W, S, V)`` CTC head output per encoder frame, valid up to ``frame_lengths``.
        frame_lengths: ``(W,)`` valid encoder frames per window.
        tokens_per_window: ``(W,)`` projected audio tokens per window (the ``<|AUDIO|>`` slots it fills).
        input_ids: ``(B, L)`` padded rows, or ``(1, L)`` for a packed row with ``cu_seqlens``.
        labels: same shape, unshifted targets, -100 outside replies.
        audio_token_id: id of ``<|AUDIO|>``.
        end_of_turn_id: the end-of-turn token, excluded from the targets (:func:`ctc_target_mask`).
        blank_id: the CTC blank (the tokenizer's pad token).
        cu_seqlens: ``(D+1,)`` document boundaries of a packed row; None for a padded batch.
        documents: one bool per document, False to leave it out (its reply is not a transcript:
            :func:`~aero_lightning.data.chat.transcript_documents`); None: every document with audio.

    Returns:
        ``(loss_sum, num_targets)``: float32 scalar, the summed negative log-likelihood over documents
        (``zero_infinity``: an impossible alignment counts 0), and the long scalar count of their target tokens.
    """
    device = frame_logits.device
    docs = batch_documents(input_ids, labels, cu_seqlens)
    slots = [int((ids == audio_token_id).sum()) for ids, _ in docs]
    per_window = tokens_per_window.tolist()
    if documents is not None and len(documents) != len(docs):
        raise ValueError(f"documents has {len(documents)} entries for {len(docs)} documents")
    spans, targets, window = [], [], 0
    for d, ((_, lab), n_slots) in enumerate(zip(docs, slots)):
        first, filled = window, 0
        while filled < n_slots:  # walked for every document: the windows are in document order
            filled += per_window[window]
            window += 1
        if documents is not None and not documents[d]:
            continue
        target = lab[ctc_target_mask(lab, end_of_turn_id)]
        if n_slots and len(target):
            spans.append((first, window))
            targets.append(target.to(device))
    if not spans:
        return frame_logits.sum() * 0.0, torch.zeros((), dtype=torch.long, device=device)
    log_probs = frame_logits.float().log_softmax(-1)  # (W, S, V)
    if all(end - first == 1 for first, end in spans):
        # every document is one window (clips up to 30 s): the windows are already CTC's padded batch, so it
        # reads them in place, transposed, instead of gathering the valid frames into a new padded copy whose
        # backward scatters into a zero tensor of the whole (W, S, V) block
        chosen = torch.tensor([first for first, _ in spans], device=device)
        if len(spans) < log_probs.shape[0]:
            log_probs = log_probs.index_select(0, chosen)
        batch_log_probs = log_probs.transpose(0, 1)  # (S, D', V)
        input_lengths = frame_lengths.to(device).index_select(0, chosen)
    else:
        valid = (
            torch.arange(frame_logits.shape[1], device=device)[None, :] < frame_lengths.to(device)[:, None]
        )
        rows = [log_probs[first:end][valid[first:end]] for first, end in spans]  # (frames_d, V) each
        batch_log_probs = nn.utils.rnn.pad_sequence(rows)  # (T_max, D', V)
        input_lengths = torch.tensor([len(r) for r in rows], device=device)
    target_lengths = torch.tensor([len(t) for t in targets], device=device)
    loss_sum = nn.functional.ctc_loss(
        batch_log_probs,
        torch.cat(targets),
        input_lengths,
        target_lengths,
        blank=blank_id,
        reduction="sum",
        zero_infinity=True,
    )
    return loss_sum, target_lengths.sum()
