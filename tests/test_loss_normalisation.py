"""The loss is the sum of token losses over the global batch / its target tokens: the step's
gradient does not depend on micro-batch size, accumulation or world size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ddp_grads import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return run(tiny_dir, world=1, micro=4, accum=1)


@pytest.mark.parametrize(("micro", "accum"), [(2, 2), (1, 4)])
def test_gradients_invariant_to_micro_batch_and_accumulation(tiny_dir, reference, micro, accum):
    _close(run(tiny_dir, world=1, micro=micro, accum=accum), reference)


def test_per_micro_batch_mean_would_differ(tiny_dir, reference):
    """Without the group token count each micro-batch is its own mean: the gradients differ (the bug fixed)."""
    naive = run(tiny_dir, world=1, micro=1, accum=4, grouped=False)
    name = next(n for n in reference if n.startswith("model.llm."))
    assert not torch.allclose(naive[name], reference[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("micro", "accum"), [(2, 1), (1, 2)])
def test_gradients_invariant_to_world_size(tiny_dir, reference, tmp_path, micro, accum):
    """DDP with 2 CPU processes (gloo), each with half the documents, gives the single-process gradient."""
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
        ],
        cwd=ROOT,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _close(torch.load(out), reference)
