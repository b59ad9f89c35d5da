"""The chunked loss equals full-logits cross-entropy; Liger falls back cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

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
