"""Projectors: exact values with identity weights, output lengths, and invariance to frames past the length."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aero_lightning.model.projector import PROJECTORS, AvgPoolProjector, MLPStackProjector, projector_spec


def _identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features))
        linear.bias.zero_()


def _frames(seq_len: int = 5, dim: int = 3) -> torch.Tensor:
    """``(1, seq_len, dim)`` with frame ``s`` = ``[s+1, -(s+1), 10 (s+1)]`` (distinct, signed)."""
    base = torch.arange(1, seq_len + 1, dtype=torch.float32)[:, None]
    return (base * torch.tensor([1.0, -1.0, 10.0]))[None, :, :dim]


def _identity_mlp_stack(dim: int, k: int) -> MLPStackProjector:
    proj = MLPStackProjector(encoder_dim=dim, llm_dim=dim * k, stack_factor=k, hidden_dim=dim * k)
    _identity(proj.fc1)
    _identity(proj.fc2)
    return proj


@torch.no_grad()
def test_mlp_stack_stacks_consecutive_frames_and_zero_pads():
    x = _frames(5, 3)  # (1, 5, 3)
    proj = _identity_mlp_stack(dim=3, k=2)
    out, lengths = proj(x, torch.tensor([5]))
    f = x[0]
    zero = torch.zeros(3)
    stacked = torch.stack(
        [torch.cat([f[0], f[1]]), torch.cat([f[2], f[3]]), torch.cat([f[4], zero])]
    )  # (3, 6)
    assert out.shape == (1, 3, 6)
    assert lengths.tolist() == [3]
    torch.testing.assert_close(out[0], nn.functional.gelu(stacked), rtol=0, atol=0)
    # gelu(0) = 0: the padded half of the last token is exactly zero
    assert torch.equal(out[0, 2, 3:], zero)


@torch.no_grad()
def test_mlp_stack_ignores_frames_past_length():
    torch.manual_seed(0)
    proj = MLPStackProjector(encoder_dim=3, llm_dim=4, stack_factor=2, hidden_dim=8)
    x = torch.randn(2, 5, 3)
    lengths = torch.tensor([3, 5])
    garbage = x.clone()
    garbage[0, 3:] = 1e3 * torch.randn(2, 3)
    out, out_lengths = proj(x, lengths)
    out_garbage, _ = proj(garbage, lengths)
    assert out_lengths.tolist() == [2, 3]
    assert torch.equal(out, out_garbage)
    # frame 3 is past the length of row 0: token 1 sees [x2, 0]
    clean = x.clone()
    clean[0, 3:] = 0
    assert torch.equal(out[0, :2], proj(clean[:1], torch.tensor([5]))[0][0, :2])


@pytest.mark.parametrize(
    "projector", [MLPStackProjector(3, 4, stack_factor=4, hidden_dim=8), AvgPoolProjector(3, 4)]
)
def test_output_lengths_are_ceil(projector):
    k = projector.downsample
    for s in (1, 2, 3, 4, 5, 7, 8, 9, 1500):
        assert projector.output_lengths(s) == math.ceil(s / k)
    lengths = torch.tensor([1, 4, 5, 1500])
    assert projector.output_lengths(lengths).tolist() == [math.ceil(s / k) for s in lengths.tolist()]
    for seq_len in (1, 5, 9):
        out, out_lengths = projector(torch.randn(1, seq_len, 3), torch.tensor([seq_len]))
        assert out.shape == (1, math.ceil(seq_len / k), 4) and out_lengths.tolist() == [
            math.ceil(seq_len / k)
        ]


@torch.no_grad()
def test_avgpool_averages_pairs_and_odd_last_frame_alone():
    x = _frames(5, 3)  # frames (1,-1,10), (2,-2,20), ..., (5,-5,50)
    proj = AvgPoolProjector(encoder_dim=3, llm_dim=3, pool=2)
    _identity(proj.linear)
    out, lengths = proj(x, torch.tensor([5]))
    expected = torch.tensor([[1.5, -1.5, 15.0], [3.5, -3.5, 35.0], [5.0, -5.0, 50.0]])
    assert lengths.tolist() == [3]
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)

    # length 3: the pair (x2, x3) has one valid frame, averaged alone; frames 3, 4 (garbage) are ignored
    garbage = x.clone()
    garbage[0, 3:] = 1e4
    out3, lengths3 = proj(garbage, torch.tensor([3]))
    assert lengths3.tolist() == [2]
    torch.testing.assert_close(
        out3[0, :2], torch.tensor([[1.5, -1.5, 15.0], [3.0, -3.0, 30.0]]), rtol=0, atol=0
    )


@torch.no_grad()
def test_avgpool_ignores_frames_past_length():
    torch.manual_seed(0)
    proj = AvgPoolProjector(encoder_dim=3, llm_dim=4)
    x = torch.randn(2, 7, 3)
    lengths = torch.tensor([4, 7])
    garbage = x.clone()
    garbage[0, 4:] = 1e3 * torch.randn(3, 3)
    out, out_lengths = proj(x, lengths)
    assert out_lengths.tolist() == [2, 4]
    assert torch.equal(out[:, :2], proj(garbage, lengths)[0][:, :2])
    assert torch.equal(out, proj(garbage, lengths)[0])


def test_output_norm_fixes_the_scale_and_round_trips_through_the_spec():
    torch.manual_seed(0)
    proj = MLPStackProjector(encoder_dim=3, llm_dim=8, stack_factor=2, hidden_dim=16, output_norm=True)
    out, lengths = proj(100.0 * torch.randn(2, 6, 3), torch.tensor([6, 3]))
    # RMSNorm with unit gain: every token has root-mean-square 1 whatever the input scale
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.ones(2, 3), rtol=1e-4, atol=1e-4)
    spec = projector_spec(proj)
    assert spec == {"type": "mlp_stack", "stack_factor": 2, "hidden_dim": 16, "output_norm": True}
    kind = spec.pop("type")
    assert isinstance(PROJECTORS[kind](encoder_dim=3, llm_dim=8, **spec).norm, torch.nn.RMSNorm)
    assert projector_spec(AvgPoolProjector(3, 8, pool=2)) == {"type": "avgpool_linear", "pool": 2}
