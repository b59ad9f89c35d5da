"""Preemption at any instant, on 2 DDP processes (gloo) under a fake SLURM job step.

``python train.py`` runs as the 2 tasks of a fake ``srun`` (``helpers/fake_srun.py``: one process group, so a
signal reaches both ranks and their DataLoader workers, as SLURM signals every process of a job step). Rank 0's
``BatchRecorder`` sends SIGUSR1 or SIGTERM to the group from a gradient hook, in the middle of a backward pass,
which is the case that broke Lightning's own handling (it saved inside the handler, mid-step). The fake
``scontrol requeue`` records the call and then sends SIGTERM to the whole group, as SLURM ends a job it requeues.

Each chain of runs (a first job, then restarts with ``SLURM_RESTART_COUNT`` set, in the same run folder) must train,
on every rank, exactly the batches of one uninterrupted run, step by step. Every run is bounded by a timeout: a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.tiny import build_tiny
from omegaconf import OmegaConf

from aero_lightning.callbacks.preemption import (
    PreemptionCheckpoint,
    PreemptionStop,
    checkpoint_step,
    newest_checkpoint,
)
from aero_lightning.data.synth import build_demo_corpus
from aero_lightning.model.tiny import corpus_texts
from aero_lightning.tasks.train import resume_path

ROOT = Path(__file__).resolve().parents[1]
JOB_ID = "4711"
REFERENCE_STEPS = 10
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    corpus = root / "corpus"
    build_demo_corpus(corpus, num_train=24, num_val=4, num_test=4, seed=0, shard_size=8, progress=False)
    model = root / "model"
    build_tiny(model, corpus_texts(corpus))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # `scontrol requeue`: record it, then end the job's tasks with SIGTERM as SLURM does (this script survives it)
    scontrol.write_text('#!/bin/bash\ntrap "" TERM\necho "$*" >> "$REQUEUE_LOG"\nkill -TERM 0\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return corpus, model, bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(
    demo_env,
    run_dir: Path,
    name: str,
    *,
    restart: int,
    max_steps: int,
    accumulate: int,
    signal_name: str | None = None,
    signal_in_backward_at_step: int | None = None,
) -> str:
    """One job (2 tasks) in ``run_dir``; returns both tasks' logs. Fails on a hang or a non-zero exit."""
    corpus, model, bin_dir = demo_env
    logs = run_dir.parent / "logs" / name
    overrides = [
        "experiment=demo",
        f"paths.demo_corpus_dir={corpus}",
        f"paths.demo_model_dir={model}",
        f"hydra.run.dir={run_dir}",
        "strategy=ddp",
        "trainer.devices=2",
        f"trainer.max_steps={max_steps}",
        f"trainer.accumulate_grad_batches={accumulate}",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "run_test=false",
        "data.num_workers=1",  # a forked worker per rank: SLURM signals it too
        "data.packing.packing_length=400",
        "data.packing.buffer_size=16",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "+callbacks.recorder._target_=helpers.batch_recorder.BatchRecorder",
        f"+callbacks.recorder.path='{run_dir.parent}/{name}.rank{{rank}}.jsonl'",
    ]
    if signal_name is not None:
        overrides += [
            f"+callbacks.recorder.signal_name={signal_name}",
            f"+callbacks.recorder.signal_in_backward_at_step={signal_in_backward_at_step}",
        ]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_"))
        and k not in ("AERO_ROOT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    } | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "tests"),
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "aero_test",
        "SLURM_RESTART_COUNT": str(restart),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "REQUEUE_LOG": str(run_dir.parent / "scontrol.log"),
    }
    command = [sys.executable, "-m", "helpers.fake_srun", "--ntasks", "2", "--log-dir", str(logs), "--"]
    command += [sys.executable, "train.py", *overrides]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    text = "\n".join(f"--- task {i}\n" + (logs / f"task{i}.log").read_text() for i in range(2))
    if code is None:
        pytest.fail(f"{name}: no exit within {RUN_TIMEOUT_S} s (hang)\n{text[-4000:]}")
    assert code == 0, f"{name}: exit {code}\n{text[-4000:]}"
    return text


def _records(run_dir: Path, name: str, rank: int) -> list[tuple[int, list[str]]]:
    path = run_dir.parent / f"{name}.rank{rank}.jsonl"
    return [(r["step"], r["keys"]) for r in map(json.loads, path.read_text().splitlines())]


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def uninterrupted(demo_env, tmp_path_factory):
    """``{rank: [batch keys, ...]}`` of one run of REFERENCE_STEPS optimizer steps of one micro-batch, never
    signalled. The stream does not depend on accumulate_grad_batches: with 2 the same micro-batches come in pairs."""
    run_dir = tmp_path_factory.mktemp("reference") / "job"
    _job(demo_env, run_dir, "reference", restart=0, max_steps=REFERENCE_STEPS, accumulate=1)
    records = {rank: _records(run_dir, "reference", rank) for rank in (0, 1)}
    assert [s for s, _ in records[0]] == list(range(REFERENCE_STEPS))
    assert records[0] != records[1]  # the ranks read different batches
    return {rank: [keys for _, keys in r] for rank, r in records.items()}


# accumulate_grad_batches, then runs: (max_steps, step whose first backward gets the signal or None, hpc step or None)
CHAINS = {
    # three preemptions at three different steps, each restart resuming from the hpc checkpoint just written
    "SIGUSR1": (1, [(10, 1, 2), (10, 3, 4), (10, 4, 5)]),
    # 2 micro-batches per step: the signal lands in the first, the save waits for the optimizer step. Three
    # preemptions at three different steps, and between the first two a restart that ends at step 3 with
    # checkpoints/last.ckpt (a job that wrote a periodic checkpoint after the hpc one and then died without a
    # signal): the next restart must resume from that later last.ckpt, not from the stale hpc_ckpt_1
    "SIGTERM": (2, [(10, 0, 1), (3, None, None), (10, 3, 4), (10, 4, 5)]),
}
RESUMED_FROM = {
    "SIGUSR1": ["hpc_ckpt_2.ckpt (global step 2", "hpc_ckpt_4.ckpt (global step 4"],
    "SIGTERM": [
        "hpc_ckpt_1.ckpt (global step 1",
        "last.ckpt (global step 3",
        "hpc_ckpt_4.ckpt (global step 4",
    ],
}


@pytest.mark.parametrize("signal_name", sorted(CHAINS))
def test_signal_mid_backward_saves_at_the_step_boundary_and_resumes_with_the_same_batches(
    demo_env, uninterrupted, tmp_path, signal_name
):
    accumulate, runs = CHAINS[signal_name]
    run_dir = tmp_path / "job"
    requeues = tmp_path / "scontrol.log"
    trained = {0: [], 1: []}
    resumed_from = []
    for i, (max_steps, at_step, saved_step) in enumerate(runs):
        name = f"run{i}"
        result = run_dir / "result.json"
        result_before = result.read_text() if result.exists() else None
        log = _job(
            demo_env,
            run_dir,
            name,
            restart=i,
            max_steps=max_steps,
            accumulate=accumulate,
            signal_name=signal_name if at_step is not None else None,
            signal_in_backward_at_step=at_step,
        )
        assert "DataLoader worker" not in log, log[-3000:]  # the forked workers ignored the signal
        assert "Handling auto-requeue signal" not in log  # Lightning's in-handler save stayed off
        resumed_from += [
            line.split("resuming from ", 1)[1] for line in log.splitlines() if "resuming from " in line
        ]
        for rank in (0, 1):
            trained[rank] += _records(run_dir, name, rank)
        n_requeues = len(requeues.read_text().splitlines()) if requeues.exists() else 0
        assert n_requeues == sum(s is not None for _, _, s in runs[: i + 1])  # once per preemption, by rank 0
        if saved_step is None:
            assert _step(run_dir / "checkpoints" / "last.ckpt") == max_steps
            continue
        state = torch.load(run_dir / f"hpc_ckpt_{saved_step}.ckpt", map_location="cpu", weights_only=False)
        # saved after the optimizer step the signal interrupted, with data streams that agree with that step
        assert state["global_step"] == saved_step and state["lr_schedulers"][0]["last_epoch"] == saved_step
        assert trained[0][-1][0] == saved_step - 1  # the last batch trained made the saved step
        if i == 0:
            assert [r["consumed"] for r in state["AeroDataModule"]["ranks"]] == [saved_step * accumulate] * 2
        assert requeues.read_text().splitlines()[-1] == f"requeue {JOB_ID}"
        # stopped after the save: no test decode, no result.json (the one of the run that ended at step 3 stays)
        assert (result.read_text() if result.exists() else None) == result_before

    # every rank trained exactly the uninterrupted run's micro-batches, each at its step, none twice or skipped
    for rank in (0, 1):
        steps, keys = zip(*trained[rank])
        assert list(keys) == uninterrupted[rank][: len(keys)], f"rank {rank}"
        assert list(steps) == [j // accumulate for j in range(len(keys))]
    assert len(trained[0]) == runs[-1][2] * accumulate
    # one line per rank and restart
    assert [r.split("/")[-1].split(",")[0] for r in resumed_from] == [
        e for e in RESUMED_FROM[signal_name] for _ in (0, 1)
    ]


# ------------------------------------------------------------------------------------------ in-process, one rank
class _SignalAfterBackward(L.Callback):
    """Sends ``sig`` to this process after the backward of the step at ``global_step == at_step`` (before its
    optimizer step) and notes which hpc checkpoints existed right after the handler ran."""

    def __init__(self, sig: signal.Signals, at_step: int, folder: Path):
        self.sig, self.at_step, self.folder = sig, at_step, folder
        self.files_after_signal: list[str] | None = None

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.at_step and self.files_after_signal is None:
            os.kill(os.getpid(), self.sig)  # the handler runs before the next line
            self.files_after_signal = sorted(p.name for p in self.folder.glob("hpc_ckpt_*"))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
@pytest.mark.parametrize("lightning_requeue", [False, True])
def test_the_handler_only_sets_a_flag_and_the_save_follows_the_step(
    tmp_path, monkeypatch, sig, lightning_requeue
):
    """One process: the signal arrives between backward and optimizer step of step 3; nothing is saved in the
    handler, the checkpoint holds step 3 and fit ends with PreemptionStop (exit status 0); then the signal goes to
    the handler from before fit again.
    With Lightning's SLURMEnvironment(auto_requeue=True) too, only this callback saves (Lightning's in-handler save
    would have written hpc_ckpt_1.ckpt with step 2, mid-step)."""
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    plugins = []
    if lightning_requeue:
        for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
                           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "t"}.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # no requeue attempted
        plugins = [SLURMEnvironment(auto_requeue=True)]
    callback = PreemptionCheckpoint(dirpath=tmp_path)
    sender = _SignalAfterBackward(sig, at_step=2, folder=tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback, sender],
        plugins=plugins or None,
    )
    after_fit = []
    original = {s: signal.signal(s, lambda signum, frame: after_fit.append(signum)) for s in (sig,)}
    try:
        with pytest.raises(PreemptionStop) as stop:
            trainer.fit(BoringModel())
        os.kill(os.getpid(), sig)  # after fit: the handler from before fit gets it
    finally:
        for s, handler in original.items():
            signal.signal(s, handler)
    assert after_fit == [sig]
    assert stop.value.code == 0 and stop.value.step == 3
    assert callback.received == sig.name
    assert sender.files_after_signal == []  # the handler saved nothing
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_3.ckpt"]
    assert checkpoint_step(tmp_path / "hpc_ckpt_3.ckpt") == 3


def test_a_signal_on_the_final_step_lets_the_run_end_normally(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    callback = PreemptionCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback, _SignalAfterBackward(signal.SIGUSR1, at_step=2, folder=tmp_path)])  # fmt: skip
    trainer.fit(BoringModel())
    assert trainer.global_step == 3 and callback.received == "SIGUSR1"
    assert not list(tmp_path.glob("hpc_ckpt_*"))


# ------------------------------------------------------------------------------------------ resume selection
def _ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(3)}}, path)
    return path


def _cfg(run: Path, ckpt_path: str | None = None):
    return OmegaConf.create(
        {
            "ckpt_path": ckpt_path,
            "paths": {"output_dir": str(run)},
            "callbacks": {
                "preemption": {"dirpath": str(run)},
                "model_checkpoint": {"dirpath": str(run / "checkpoints")},
            },
        }
    )


def test_resume_takes_the_newer_of_hpc_and_last_and_only_for_an_interrupted_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_path(_cfg(run)) is None  # a fresh run
    last = _ckpt(run / "checkpoints" / "last.ckpt", 4)
    assert resume_path(_cfg(run)) is None  # a reused folder (outputs/demo) starts anew, as before
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_path(_cfg(run)) == str(last)  # requeued after a node failure: no signal, no hpc checkpoint
    hpc2 = _ckpt(run / "hpc_ckpt_2.ckpt", 2)
    assert resume_path(_cfg(run)) == str(last)  # the stale hpc checkpoint loses to the later last.ckpt
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_path(_cfg(run)) is None  # the run went on past its hpc checkpoint
    hpc6 = _ckpt(run / "hpc_ckpt_6.ckpt", 6)
    assert resume_path(_cfg(run)) == str(hpc6)  # stopped by SIGTERM outside SLURM
    (run / "hpc_ckpt_9.ckpt").write_bytes(b"cut short by a node failure")
    assert resume_path(_cfg(run)) == str(hpc6)  # an unreadable checkpoint is skipped
    assert resume_path(_cfg(run, ckpt_path=str(hpc2))) == str(hpc2)  # an explicit ckpt_path always wins


def test_checkpoint_step_reads_files_and_sharded_folders(tmp_path):
    assert checkpoint_step(_ckpt(tmp_path / "single.ckpt", 7)) == 7
    # Lightning's ModelParallelStrategy (FSDP2) folder: shards plus meta.pt with the non-tensor state
    _ckpt(tmp_path / "fsdp.ckpt" / "meta.pt", 8)
    (tmp_path / "fsdp.ckpt" / "__0_0.distcp").write_bytes(b"")
    assert checkpoint_step(tmp_path / "fsdp.ckpt") == 8
    # DeepSpeed folder: Lightning's client state is in the model-states file
    _ckpt(tmp_path / "ds.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt", 9)
    assert checkpoint_step(tmp_path / "ds.ckpt") == 9
    (tmp_path / "empty.ckpt").mkdir()
    with pytest.raises(FileNotFoundError):
        checkpoint_step(tmp_path / "empty.ckpt")
    assert newest_checkpoint([tmp_path / "missing.ckpt"]) is None
