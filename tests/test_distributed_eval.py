"""Evaluation under several processes on CPU: validation loss, the WER callback and the test decode under DDP and
FSDP2 (parameters sharded: equal batch counts per rank, synced generation) equal one process on the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aero_lightning.data.synth import build_demo_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    # 5 validation and 5 test utterances in shards of 2: 3 shards, which 2 ranks cannot split evenly
    build_demo_corpus(out, num_train=8, num_val=5, num_test=5, seed=0, shard_size=2, progress=False)
    return out


def _run(tiny_dir: Path, corpus: Path, out: Path, strategy: str, world: int) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "dist_eval.py"), str(tiny_dir), str(corpus), str(out),
         strategy, str(world)],
        cwd=ROOT,
        env=env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tiny_dir, corpus, tmp_path_factory):
    return _run(tiny_dir, corpus, tmp_path_factory.mktemp("single") / "out.pt", "auto", 1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_evaluate_like_one(tiny_dir, corpus, single, tmp_path, strategy):
    got = _run(tiny_dir, corpus, tmp_path / "out.pt", strategy, 2)
    assert got["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)  # repeats carry no loss
    assert got["val_wer"] == single["val_wer"] and single["val_wer"]["num_samples"] == 5  # WER callback
    assert got["test_records"] == single["test_records"] and len(single["test_records"]) == 5  # each once
    assert got["test_wer"] == single["test_wer"]
