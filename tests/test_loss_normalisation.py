"""The loss is the sum of token losses over the global batch / its target tokens, for the LM term and the auxiliary
CTC term alike: the step's gradient does not depend on micro-batch size, accumulation or world size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ddp_grads import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _close(a: dict, b: dict, loss: str = "lm") -> None:
    """Equal gradients. The CTC forward-backward sums over frames in another order when the documents are split
    differently, so with a CTC term the absolute tolerance is 5e-5 of the tensor's largest gradient (float32
    reduction noise measured here: up to 1.5e-5 of it; a per-micro-batch CTC mean is off by percents)."""
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        atol = 1e-6 if loss == "lm" else 5e-5 * float(b[name].abs().max())
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


LOSSES = ["lm", "lm_ctc", "ctc_only"]


@pytest.fixture(scope="module", params=LOSSES)
def reference(tiny_dir, request):
    """The loss setting and its gradients with all 4 documents in one micro-batch of one process."""
    return request.param, run(tiny_dir, world=1, micro=4, accum=1, loss=request.param)


@pytest.mark.parametrize(("micro", "accum"), [(2, 2), (1, 4)])
def test_gradients_invariant_to_micro_batch_and_accumulation(tiny_dir, reference, micro, accum):
    loss, grads = reference
    got = run(tiny_dir, world=1, micro=micro, accum=accum, loss=loss)
    _close(got, grads, loss)
    if loss != "lm":  # the CTC head gets its gradient from the CTC term only
        assert "model.ctc_head.weight" in got


def test_per_micro_batch_mean_would_differ(tiny_dir, reference):
    """Without the group token counts each micro-batch is its own mean: the gradients differ (the bug fixed)."""
    loss, grads = reference
    naive = run(tiny_dir, world=1, micro=1, accum=4, grouped=False, loss=loss)
    prefix = "model.llm." if loss == "lm" else "model.ctc_head."
    name = next(n for n in grads if n.startswith(prefix))
    assert not torch.allclose(naive[name], grads[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("micro", "accum"), [(2, 1), (1, 2)])
def test_gradients_invariant_to_world_size(tiny_dir, reference, tmp_path, micro, accum):
    """DDP with 2 CPU processes (gloo), each with half the documents, gives the single-process gradient."""
    loss, grads = reference
    out = tmp_path / "grads.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "helpers" / "ddp_grads.py"),
            str(tiny_dir),
            str(out),
            "2",
            str(micro),
            str(accum),
            loss,
        ],
        cwd=ROOT,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _close(torch.load(out), grads, loss)
