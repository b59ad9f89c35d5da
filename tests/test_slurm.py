"""SLURM: the sbatch script, the SLURM cluster environment, and preemption (SIGUSR1 -> hpc checkpoint -> requeue ->
resume with the next unseen batches) on a CPU training run under fake SLURM variables."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny import build_tiny
from lightning.pytorch.plugins.environments import SLURMEnvironment

from aero_lightning.data.synth import build_demo_corpus
from aero_lightning.model.tiny import corpus_texts
from aero_lightning.strategies import slurm_environment

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "aero.sbatch"
SLURM_VARS = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_ID": "777",
    "SLURM_JOB_NAME": "aero_test",
    "SLURM_NODELIST": "localhost",
}


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("AERO_ROOT",)}
    return env | extra


# ------------------------------------------------------------------------------------------------ sbatch script
def test_sbatch_parses():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)"
)
def test_sbatch_passes_shellcheck():
    proc = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_directives():
    directives = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=SIGUSR1@120" in directives
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert (
        "--nodes=2" in directives
        and "--ntasks-per-node=8" in directives
        and "--gpus-per-node=8" in directives
    )


@pytest.fixture
def fake_cluster(tmp_path):
    """A bin folder with ``srun`` (records its arguments and environment) and ``scontrol show hostnames``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.json"
    _script(
        bin_dir / "srun",
        f'python3 -c \'import json, os, sys; json.dump({{"argv": sys.argv[1:], "MASTER_ADDR": os.environ.get("MASTER_ADDR"),'
        f' "MASTER_PORT": os.environ.get("MASTER_PORT")}}, open("{record}", "w"))\' "$@"\n',
    )
    _script(
        bin_dir / "scontrol", 'if [[ "$1 $2" == "show hostnames" ]]; then echo gpu-a01; echo gpu-a02; fi\n'
    )
    return bin_dir, record


def _run_sbatch(tmp_path, bin_dir, *args, **slurm):
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_PER_TASK="12",
        SLURM_JOB_NODELIST="gpu-a[01-02]",
        SLURM_SUBMIT_DIR=str(tmp_path),
        AERO_PYTHON="python-of-the-venv",
    )
    env.update(slurm)
    return subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_sbatch_runs_one_task_per_gpu_with_nodes_and_gpus_from_slurm(tmp_path, fake_cluster):
    bin_dir, record = fake_cluster
    proc = _run_sbatch(tmp_path, bin_dir, "trainer.max_steps=10")
    assert proc.returncode == 0, proc.stderr
    call = json.loads(record.read_text())
    argv = call["argv"]
    assert "--ntasks-per-node=8" in argv and "--cpus-per-task=12" in argv and "--kill-on-bad-exit=1" in argv
    assert "--output=logs/%x-%j-rank%t.out" in argv
    cmd = argv[argv.index("python-of-the-venv") :]
    assert cmd == [
        "python-of-the-venv",
        "train.py",
        "experiment=aero_full",
        "trainer.num_nodes=2",
        "trainer.devices=8",
        "hydra.run.dir=outputs/aero_full/slurm-4242",  # the job id: the same folder after a requeue
        "trainer.max_steps=10",
    ]
    assert call["MASTER_ADDR"] == "gpu-a01" and call["MASTER_PORT"] == str(15000 + 4242)
    assert (tmp_path / "logs").is_dir() and (tmp_path / "outputs/aero_full/slurm-4242").is_dir()


def test_sbatch_requeued_after_a_node_failure_resumes_from_last_ckpt(tmp_path, fake_cluster):
    """A restart without an hpc checkpoint (no signal came) continues from checkpoints/last.ckpt; with one, the
    script leaves ckpt_path unset so that Lightning picks the hpc checkpoint."""
    bin_dir, record = fake_cluster
    run_dir = tmp_path / "outputs/aero_full/slurm-4242"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert _run_sbatch(tmp_path, bin_dir).returncode == 0  # first start: nothing to resume
    assert not any(a.startswith("ckpt_path=") for a in json.loads(record.read_text())["argv"])
    assert _run_sbatch(tmp_path, bin_dir, SLURM_RESTART_COUNT="1").returncode == 0
    argv = json.loads(record.read_text())["argv"]
    assert argv[-1] == "ckpt_path=outputs/aero_full/slurm-4242/checkpoints/last.ckpt"
    (run_dir / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert _run_sbatch(tmp_path, bin_dir, SLURM_RESTART_COUNT="2").returncode == 0
    assert not any(a.startswith("ckpt_path=") for a in json.loads(record.read_text())["argv"])


def test_sbatch_refuses_more_tasks_than_gpus(tmp_path, fake_cluster):
    bin_dir, record = fake_cluster
    proc = _run_sbatch(tmp_path, bin_dir, SLURM_GPUS_ON_NODE="4")
    assert proc.returncode == 2
    assert "one task per GPU" in proc.stderr and not record.exists()


# ------------------------------------------------------------------------------------------------ environment
def test_slurm_environment_only_under_srun(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    assert slurm_environment() is None
    for key, value in SLURM_VARS.items():
        monkeypatch.setenv(key, value)
    env = slurm_environment(requeue_signal="USR1")
    assert isinstance(env, SLURMEnvironment)
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert env.world_size() == 1 and env.global_rank() == 0 and env.job_id() == 777
    assert slurm_environment(auto_requeue=False, requeue_signal="SIGUSR2").requeue_signal == signal.SIGUSR2
    monkeypatch.setenv(
        "SLURM_JOB_NAME", "interactive"
    )  # `srun --pty bash`-style sessions are not jobs to requeue
    assert slurm_environment() is None


# ------------------------------------------------------------------------------------------------ preemption
@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    corpus = root / "corpus"
    build_demo_corpus(corpus, num_train=24, num_val=4, num_test=4, seed=0, shard_size=8, progress=False)
    model = root / "model"
    build_tiny(model, corpus_texts(corpus))
    return root, corpus, model


def _train(run_dir: Path, keys: Path, env: dict, corpus: Path, model: Path, signal_at_step: int | None):
    overrides = [
        "experiment=demo",
        f"paths.demo_corpus_dir={corpus}",
        f"paths.demo_model_dir={model}",
        f"hydra.run.dir={run_dir}",
        "data.num_workers=1",  # a forked worker: SLURM signals it too
        "data.packing.packing_length=400",
        "data.packing.buffer_size=16",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=6",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
        "run_test=false",
        "+callbacks.recorder._target_=helpers.batch_recorder.BatchRecorder",
        f"+callbacks.recorder.path={keys}",
        f"+callbacks.recorder.signal_at_step={'null' if signal_at_step is None else signal_at_step}",
    ]
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # the run signals its own process group, like SLURM signals a job step
    )


def _steps(keys: Path) -> dict[int, list[str]]:
    return {r["step"]: r["keys"] for r in map(json.loads, keys.read_text().splitlines())}


def test_sigusr1_saves_hpc_checkpoint_requeues_and_resumes_with_next_unseen_batches(demo_env, tmp_path):
    _, corpus, model = demo_env
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeue_log = tmp_path / "scontrol.log"
    # scontrol requeue: record, then terminate the job the way SLURM does before requeueing it
    _script(bin_dir / "scontrol", f'echo "$*" >> {requeue_log}\nkill -TERM "$PPID"\n')
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT / "tests"),
        HYDRA_FULL_ERROR="1",
        PYTHONUNBUFFERED="1",
        **SLURM_VARS,
    )

    reference = _train(tmp_path / "reference", tmp_path / "reference.jsonl", env, corpus, model, None)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _steps(tmp_path / "reference.jsonl")
    assert sorted(expected) == [0, 1, 2, 3, 4, 5]
    assert not requeue_log.exists()

    run_dir = tmp_path / "job"
    first = _train(run_dir, tmp_path / "first.jsonl", env, corpus, model, signal_at_step=3)
    log = first.stdout + first.stderr
    assert "DataLoader worker" not in log, log[-3000:]  # the forked worker ignored the signal
    assert log.count("Handling auto-requeue signal") == 1
    assert requeue_log.read_text().splitlines() == ["requeue 777"]  # once, by rank 0, with the job id
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    ckpt = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["AeroDataModule"]["ranks"][0]["consumed"] == 3  # the data-stream position came along
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"][0]["last_epoch"] == 3
    first_steps = _steps(tmp_path / "first.jsonl")
    assert sorted(first_steps) == [0, 1, 2]  # SIGTERM after the requeue ended the job
    assert all(first_steps[s] == expected[s] for s in first_steps)
    assert not (run_dir / "result.json").exists()

    resumed = _train(run_dir, tmp_path / "resumed.jsonl", env, corpus, model, None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in resumed.stdout + resumed.stderr  # Lightning restored from the hpc checkpoint
    resumed_steps = _steps(tmp_path / "resumed.jsonl")
    assert sorted(resumed_steps) == [3, 4, 5]
    assert [resumed_steps[s] for s in (3, 4, 5)] == [expected[s] for s in (3, 4, 5)]  # next unseen batches
    assert requeue_log.read_text().splitlines() == ["requeue 777"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6
