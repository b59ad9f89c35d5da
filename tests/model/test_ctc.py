"""ctc_loss_sum against a per-document reference: loss and gradients, one-window and several-window documents."""

from __future__ import annotations

import pytest
import torch

from aero_lightning.model.ctc import ctc_loss_sum

AUDIO, EOT, BLANK, VOCAB = 7, 9, 0, 12


def _document(n_slots: int, target: list[int]) -> tuple[list[int], list[int]]:
    """A document's ids and labels: ``n_slots`` audio slots, a reply ``target`` + end of turn."""
    ids = [1] + [AUDIO] * n_slots + [2] + target + [EOT]
    labels = [-100] * (n_slots + 2) + target + [EOT]
    return ids, labels


def _padded(docs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(i) for i, _ in docs)
    ids = torch.tensor([i + [BLANK] * (width - len(i)) for i, _ in docs])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in docs])
    return ids, labels


def _reference(frame_logits, frame_lengths, windows_of_doc, targets):
    """Each document alone: its windows' valid frames concatenated, log-softmax, one ``ctc_loss`` call."""
    total = 0.0
    for windows, target in zip(windows_of_doc, targets):
        frames = torch.cat([frame_logits[w, : frame_lengths[w]] for w in windows])  # (T_d, V)
        total = total + torch.nn.functional.ctc_loss(
            frames.log_softmax(-1)[:, None],
            torch.tensor([target]),
            [len(frames)],
            [len(target)],
            blank=BLANK,
            reduction="sum",
            zero_infinity=True,
        )
    return total


@pytest.mark.parametrize(
    "windows_of_doc",
    [
        [[0], [1], [2]],  # one window each: CTC reads the window block in place
        [[0], [1, 2]],  # the second document spans two windows: its frames are concatenated
    ],
)
def test_ctc_loss_sum_equals_per_document_reference(windows_of_doc):
    torch.manual_seed(0)
    frame_lengths = torch.tensor([20, 13, 17])
    tokens_per_window = torch.tensor([5, 4, 4])
    targets = [[3, 4, 5, 4], [6, 3, 3, 8, 5], [4, 10]][: len(windows_of_doc)]
    docs = [
        _document(int(tokens_per_window[windows].sum()), target)
        for windows, target in zip(windows_of_doc, targets)
    ]
    input_ids, labels = _padded(docs)
    logits = torch.randn(3, 20, VOCAB, requires_grad=True)
    loss, count = ctc_loss_sum(
        logits, frame_lengths, tokens_per_window, input_ids, labels, AUDIO, EOT, blank_id=BLANK
    )
    (grad,) = torch.autograd.grad(loss, logits)
    ref = _reference(logits, frame_lengths, windows_of_doc, targets)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert int(count) == sum(len(t) for t in targets)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    # frames past a window's length get no gradient
    assert all(grad[w, int(n) :].abs().sum() == 0 for w, n in enumerate(frame_lengths))


def test_documents_without_targets_are_left_out_of_the_one_window_batch():
    torch.manual_seed(1)
    frame_lengths = torch.tensor([11, 15])
    tokens_per_window = torch.tensor([3, 4])
    docs = [_document(3, []), _document(4, [5, 6, 8])]  # the first reply is only the end of turn
    input_ids, labels = _padded(docs)
    logits = torch.randn(2, 15, VOCAB, requires_grad=True)
    loss, count = ctc_loss_sum(
        logits, frame_lengths, tokens_per_window, input_ids, labels, AUDIO, EOT, blank_id=BLANK
    )
    (grad,) = torch.autograd.grad(loss, logits)
    ref = _reference(logits, frame_lengths, [[1]], [[5, 6, 8]])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    assert int(count) == 3 and grad[0].abs().sum() == 0


def test_documents_flagged_false_are_walked_but_left_out():
    # the middle document (a classification label, not a transcript) spans window 1 and adds nothing
    torch.manual_seed(2)
    frame_lengths = torch.tensor([20, 13, 17])
    tokens_per_window = torch.tensor([5, 4, 4])
    targets = [[3, 4, 5, 4], [6, 3], [4, 10]]
    docs = [_document(int(n), t) for n, t in zip(tokens_per_window, targets)]
    input_ids, labels = _padded(docs)
    logits = torch.randn(3, 20, VOCAB, requires_grad=True)
    loss, count = ctc_loss_sum(
        logits, frame_lengths, tokens_per_window, input_ids, labels, AUDIO, EOT, blank_id=BLANK,
        documents=[True, False, True],
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logits)
    ref = _reference(logits, frame_lengths, [[0], [2]], [targets[0], targets[2]])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    assert int(count) == 6 and grad[1].abs().sum() == 0 and grad[2].abs().sum() > 0
    with pytest.raises(ValueError, match="2 entries for 3 documents"):
        ctc_loss_sum(
            logits, frame_lengths, tokens_per_window, input_ids, labels, AUDIO, EOT, blank_id=BLANK,
            documents=[True, False],
        )  # fmt: skip
