"""Token-budget planners and the packed batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.chat import IGNORE_INDEX
from aero_lightning.data.packing import (
    collate_packed,
    collate_padded,
    plan_batches,
    plan_packed,
    plan_padded,
    plan_stats,
)

COUNTER = AudioTokenCounter(encoder_downsample=2, projector_downsample=4)


def test_first_fit_decreasing_hand_example():
    # sorted 5,4,3,3,2,1 into 8: 5->A(3 left) 4->B(4) 3->A(0) 3->B(1) 2->C(6) 1->B(0)
    assert plan_packed([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


def test_padded_plan_hand_example():
    # sorted 5,4,3,3,2,1 with len * max <= 8: [5] (2*5 > 8), [4,3] (3*4 > 8), [3,2] (3*3 > 8), [1]
    assert plan_padded([5, 4, 3, 3, 2, 1], 8) == [[0], [1, 2], [3, 4], [5]]
    # arrival order: [5] (2*5 > 8), [4,3] (3*4 > 8), [3,2] (3*3 > 8), [1]; and 1,4: 2*4 = 8 fits
    assert plan_padded([5, 4, 3, 3, 2, 1], 8, sort=False) == [[0], [1, 2], [3, 4], [5]]
    assert plan_padded([1, 4, 2, 2], 8, sort=False) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_plans_cover_every_sample_once_within_budget(mode):
    rng = np.random.default_rng(0)
    costs = rng.integers(1, 300, size=500).tolist()
    plan = plan_batches(costs, 1000, mode)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(len(costs)))
    for b in plan:
        used = sum(costs[i] for i in b) if mode == "packed" else len(b) * max(costs[i] for i in b)
        assert used <= 1000
    stats = plan_stats(costs, plan, mode, 1000)
    assert stats["real_tokens"] == sum(costs)
    assert stats["budget_tokens"] == 1000 * len(plan)
    if mode == "packed":
        # FFD on this many small items leaves at most one bin under half full: fill is high
        assert stats["fill_ratio"] > 0.95 and stats["real_fraction"] == 1.0
    else:
        assert stats["computed_tokens"] >= stats["real_tokens"]


def test_over_budget_and_bad_mode_raise():
    with pytest.raises(ValueError, match="packing_length"):
        plan_packed([10, 2000], 1000)
    with pytest.raises(ValueError, match="packing_length"):
        plan_padded([1001], 1000)
    with pytest.raises(ValueError, match="mode"):
        plan_batches([1], 10, "ragged")


def test_packed_batch_contract(tokenizer, make_encoded):
    samples = make_encoded(tokenizer, COUNTER, [0.7, 2.3, 31.0, 1.1])
    batch = collate_packed(samples, COUNTER)
    lengths = [len(s["input_ids"]) for s in samples]
    total = sum(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert "attention_mask" not in batch
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == np.cumsum([0, *lengths]).tolist()
    assert batch["max_seqlen"] == max(lengths)
    cu = batch["cu_seqlens"].tolist()
    for d, s in enumerate(samples):
        a, b = cu[d], cu[d + 1]
        assert batch["input_ids"][0, a:b].tolist() == s["input_ids"]
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))  # restart per document
        assert batch["labels"][0, a] == IGNORE_INDEX  # never predicted across the boundary
        assert batch["labels"][0, a + 1 : b].tolist() == s["labels"][1:]
    # the 31 s clip is two windows; windows are in document order
    assert batch["window_lengths"].tolist() == [11_200, 36_800, 480_000, 16_000, 17_600]
    frames = COUNTER.encoder_frames(batch["window_lengths"])
    assert frames.tolist() == [35, 115, 1500, 50, 55]
    assert batch["encoder_cu_seqlens"].dtype == torch.int32
    assert batch["encoder_cu_seqlens"].tolist() == [0, 35, 150, 1650, 1700, 1755]
    assert batch["keys"] == ["utt0", "utt1", "utt2", "utt3"]
    # no L x L tensor anywhere: every tensor is at most (1, L) or the audio
    for name, value in batch.items():
        if torch.is_tensor(value) and name != "audio_pcm":
            assert value.numel() <= total + 1, name


def test_packed_and_padded_carry_the_same_documents(tokenizer, make_encoded):
    samples = make_encoded(tokenizer, COUNTER, [0.7, 2.3, 1.1])
    packed = collate_packed(samples, COUNTER)
    padded = collate_padded(samples, COUNTER, pad_id=tokenizer.pad_token_id)
    mask = padded["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][mask])
    assert torch.equal(packed["audio_pcm"], padded["audio_pcm"])
    # labels agree except at each document's first token, which the packed row masks
    starts = packed["cu_seqlens"][:-1].long()
    flat = padded["labels"][mask].clone()
    flat[starts] = IGNORE_INDEX
    assert torch.equal(packed["labels"][0], flat)
