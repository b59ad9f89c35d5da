"""The chunked loss equals full-logits cross-entropy; Liger falls back cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aero_lightning.model import liger
from aero_lightning.model.liger import apply_liger, liger_options, linear_cross_entropy_sum


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_loss_and_grads_equal_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    labels[1, 7:] = -100
    full = torch.nn.functional.cross_entropy(
        (hidden @ weight.T).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    g_full = torch.autograd.grad(full, (hidden, weight))
    loss, count = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=chunk)
    g = torch.autograd.grad(loss, (hidden, weight))
    assert int(count) == int((labels != -100).sum()) == 5 + 7
    torch.testing.assert_close(loss, full)
    for a, b in zip(g, g_full):
        torch.testing.assert_close(a, b)


class _GatheredInForward(nn.Module):
    """An LM head whose weight is whole only inside its forward, as under DeepSpeed ZeRO-3: ``weight`` is an
    empty tensor (what ZeRO-3 leaves in a partitioned parameter's ``data``), the values live in ``full``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.full = nn.Parameter(weight.clone())
        self.weight = torch.empty(0)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.linear(x, self.full)


@pytest.mark.parametrize("chunk", [3, 64])
def test_projection_runs_through_the_head_module_also_in_the_recompute(chunk):
    """Passing the LM head module: every chunk is projected by calling it, in the forward and again when the
    chunk is recomputed in backward, never through a bare ``weight`` read (empty under ZeRO-3)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    labels[1, 7:] = -100  # 12 targets: 4 chunks of 3, or 1 of 64
    head = _GatheredInForward(weight)
    full = F.cross_entropy((hidden @ weight.T).reshape(-1, 50), labels.reshape(-1), reduction="sum")
    g_full = torch.autograd.grad(full, hidden)[0]
    loss, count = linear_cross_entropy_sum(hidden, head, labels, chunk_tokens=chunk)
    chunks = -(-12 // chunk)
    assert int(count) == 12 and head.calls == chunks
    g_hidden, g_weight = torch.autograd.grad(loss, (hidden, head.full))
    assert head.calls == 2 * chunks  # recomputed through the module in backward
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(g_hidden, g_full)
    rows = hidden.detach().reshape(-1, 16)[labels.reshape(-1) != -100]
    probs = torch.softmax(rows @ weight.T, dim=-1)
    probs[torch.arange(12), labels.reshape(-1)[labels.reshape(-1) != -100]] -= 1.0
    torch.testing.assert_close(g_weight, probs.T @ rows)  # d(sum CE)/dW = (softmax - onehot)^T h


def test_liger_falls_back_for_a_partitioned_head_weight(monkeypatch, caplog):
    """A ZeRO-3 partitioned head weight (``ds_id`` set) never reaches Liger's kernel, which reads the raw weight:
    the chunked path through the module gives the loss, with one warning per process."""

    class _NoFused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the fused kernel must not see a partitioned weight")

    monkeypatch.setattr(liger, "LigerFusedLinearCrossEntropyLoss", _NoFused)
    monkeypatch.setattr(liger, "_warned_partitioned", False)
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    hidden = torch.randn(1, 6, 16)
    labels = torch.randint(0, 50, (1, 6))
    expected, _ = linear_cross_entropy_sum(hidden, head.weight.detach().clone(), labels)
    for _ in range(2):
        loss, count = linear_cross_entropy_sum(hidden, head, labels, use_liger=True)
        torch.testing.assert_close(loss, expected)
        assert int(count) == 6
    assert caplog.text.count("LM head weight is partitioned") == 1
    assert liger.is_partitioned(head.weight) and not liger.is_partitioned(torch.zeros(2, 2))


def test_no_targets_gives_zero_with_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, count = linear_cross_entropy_sum(hidden, torch.randn(5, 8), torch.full((1, 4), -100))
    assert float(loss) == 0.0 and int(count) == 0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_model_loss_path_equals_logits_path(make_model, make_samples, make_batch):
    model = make_model(loss_chunk_tokens=5).eval()
    batch = make_batch(model, make_samples([0.7, 2.3]))
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "feature_lengths", "labels")}
    with_logits = model(**kw)
    loss_only = model(**kw, return_logits=False)
    assert loss_only.logits is None
    assert int(loss_only.num_target_tokens) == int(with_logits.num_target_tokens)
    torch.testing.assert_close(loss_only.loss_sum, with_logits.loss_sum, rtol=1e-5, atol=1e-5)


def test_liger_falls_back_without_gpu(make_model, caplog, monkeypatch):
    monkeypatch.setattr(liger, "liger_available", lambda: False)
    model = make_model(liger=True)
    assert model.liger == {
        "rope": False,
        "rms_norm": False,
        "swiglu": False,
        "fused_linear_cross_entropy": False,
    }
    assert "liger-kernel or CUDA unavailable" in caplog.text
    assert apply_liger(model.llm) is False


def test_liger_options():
    assert liger_options(True) == dict.fromkeys(
        ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"), True
    )
    assert liger_options(None)["rope"] is False
    assert liger_options({"enabled": True, "swiglu": False})["swiglu"] is False
    assert liger_options({"enabled": False, "rope": True})["rope"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not liger.liger_available(), reason="needs CUDA and liger-kernel (extra gpu)")
def test_liger_on_matches_off_on_gpu(tiny_dir):
    from aero_lightning.model.aero import AeroModel  # noqa: F401 - import path check

    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(500, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 500, (300,), device="cuda")
    ref, _ = linear_cross_entropy_sum(hidden, weight, labels, use_liger=False)
    fused, _ = linear_cross_entropy_sum(hidden, weight, labels, use_liger=True)
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=1e-1)
