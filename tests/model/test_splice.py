"""splice_audio: projected audio fills the <|AUDIO|> slots in row-major order; mismatches are refused."""

from __future__ import annotations

import re

import pytest
import torch

from aero_lightning.model.splice import splice_audio

AUDIO = 7


def test_slots_are_filled_in_row_major_order_and_the_rest_is_untouched():
    input_ids = torch.tensor([[1, AUDIO, AUDIO, 2, 0], [AUDIO, 3, AUDIO, AUDIO, 4]])  # (2, 5): 5 slots
    inputs_embeds = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    audio = -torch.arange(1, 16, dtype=torch.float32).reshape(5, 3)  # (5, 3)
    out = splice_audio(inputs_embeds, input_ids, audio, AUDIO)
    expected = inputs_embeds.clone()
    expected[0, 1], expected[0, 2] = audio[0], audio[1]
    expected[1, 0], expected[1, 2], expected[1, 3] = audio[2], audio[3], audio[4]
    assert torch.equal(out, expected)
    assert torch.equal(inputs_embeds, torch.arange(30, dtype=torch.float32).reshape(2, 5, 3))  # not in place


def test_packed_row_is_the_same_scatter():
    rows = torch.tensor([[AUDIO, 1, AUDIO], [2, AUDIO, 3]])
    embeds = torch.randn(2, 3, 4)
    audio = torch.randn(3, 4)
    padded = splice_audio(embeds, rows, audio, AUDIO)
    packed = splice_audio(embeds.reshape(1, 6, 4), rows.reshape(1, 6), audio, AUDIO)
    assert torch.equal(packed.reshape(2, 3, 4), padded)


def test_gradients_reach_audio_and_text_embeddings():
    input_ids = torch.tensor([[AUDIO, 1, AUDIO]])
    embeds = torch.randn(1, 3, 2, requires_grad=True)
    audio = torch.randn(2, 2, requires_grad=True)
    weights = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    (splice_audio(embeds, input_ids, audio, AUDIO) * weights).sum().backward()
    assert torch.equal(audio.grad, torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    assert torch.equal(embeds.grad, torch.tensor([[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]]))


def test_audio_is_cast_to_the_embedding_dtype():
    out = splice_audio(
        torch.zeros(1, 2, 2, dtype=torch.bfloat16), torch.tensor([[AUDIO, 1]]), torch.ones(1, 2), AUDIO
    )
    assert out.dtype == torch.bfloat16 and out[0, 0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("num_audio", [1, 3])
def test_count_mismatch_raises(num_audio):
    with pytest.raises(ValueError, match=re.escape(f"{num_audio} audio embeddings for 2 <|AUDIO|> slots")):
        splice_audio(
            torch.zeros(1, 3, 2), torch.tensor([[AUDIO, 1, AUDIO]]), torch.zeros(num_audio, 2), AUDIO
        )


def test_width_mismatch_raises():
    with pytest.raises(ValueError, match="3 wide but the LLM's are 2"):
        splice_audio(torch.zeros(1, 2, 2), torch.tensor([[AUDIO, 1]]), torch.zeros(1, 3), AUDIO)
