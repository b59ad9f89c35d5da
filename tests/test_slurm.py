"""SLURM: the sbatch script (run under fake ``srun`` and ``scontrol``) and the SLURM cluster environment. Preemption
(signal -> checkpoint at a step boundary -> requeue -> resume) is tested in ``tests/test_preemption.py``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

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
    assert "--signal=USR1@300" in directives  # 300 s to write ~31 GB (the comment in the script says why)
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
        f'python3 -c \'import json, os, sys; json.dump({{"argv": sys.argv[1:], **{{k: os.environ.get(k) for k in'
        f' ("MASTER_ADDR", "MASTER_PORT", "TRITON_CACHE_DIR", "FROM_ENV_SETUP")}}}}, open("{record}", "w"))\' "$@"\n',
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


def test_sbatch_leaves_the_resume_choice_to_train_py(tmp_path, fake_cluster):
    """Whether an hpc checkpoint, a last.ckpt or both exist, on a first start or a restart, the script passes no
    ckpt_path: train.py resumes from the one with the higher global step (aero_lightning.tasks.train.resume_path;
    the script used to pass last.ckpt only when no hpc checkpoint existed, so a stale hpc checkpoint won)."""
    bin_dir, record = fake_cluster
    run_dir = tmp_path / "outputs/aero_full/slurm-4242"
    (run_dir / "checkpoints").mkdir(parents=True)
    for files, restarts in (((), "0"), (("checkpoints/last.ckpt",), "1"), (("hpc_ckpt_2.ckpt",), "2")):
        for name in files:
            (run_dir / name).write_bytes(b"")
        assert _run_sbatch(tmp_path, bin_dir, SLURM_RESTART_COUNT=restarts).returncode == 0
        assert not any(a.startswith("ckpt_path=") for a in json.loads(record.read_text())["argv"])


def test_sbatch_sources_env_setup_before_set_u(tmp_path, fake_cluster):
    """Module files reference unset variables; the set-up file is sourced outside ``set -u`` and its exports reach
    srun."""
    bin_dir, record = fake_cluster
    setup = tmp_path / "cluster_env.sh"
    setup.write_text('if [ -n "$AERO_SURELY_UNSET_VARIABLE" ]; then exit 3; fi\nexport FROM_ENV_SETUP=yes\n')
    proc = _run_sbatch(tmp_path, bin_dir, AERO_ENV_SETUP=str(setup))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(record.read_text())["FROM_ENV_SETUP"] == "yes"


def test_sbatch_puts_the_triton_cache_on_node_local_disk(tmp_path, fake_cluster):
    bin_dir, record = fake_cluster
    local = tmp_path / "node-local"
    assert _run_sbatch(tmp_path, bin_dir, TMPDIR=str(local)).returncode == 0
    assert json.loads(record.read_text())["TRITON_CACHE_DIR"] == f"{local}/triton-4242"
    assert _run_sbatch(tmp_path, bin_dir, TMPDIR="").returncode == 0  # TMPDIR empty or unset: /tmp
    assert json.loads(record.read_text())["TRITON_CACHE_DIR"] == "/tmp/triton-4242"


def test_sbatch_documents_the_nccl_flight_recorder():
    comments = "\n".join(line for line in SBATCH.read_text().splitlines() if line.startswith("#"))
    for name in (
        "TORCH_NCCL_TRACE_BUFFER_SIZE",
        "TORCH_FR_BUFFER_SIZE",
        "TORCH_NCCL_DUMP_ON_TIMEOUT",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
        "TORCH_FR_DUMP_TEMP_FILE",
    ):
        assert name in comments, name


def test_sbatch_refuses_more_tasks_than_gpus(tmp_path, fake_cluster):
    bin_dir, record = fake_cluster
    proc = _run_sbatch(tmp_path, bin_dir, SLURM_GPUS_ON_NODE="4")
    assert proc.returncode == 2
    assert "one task per GPU" in proc.stderr and not record.exists()


# ------------------------------------------------------------------------------------------------ environment
def test_slurm_environment_only_under_srun_with_lightnings_requeue_off(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(key)
    assert slurm_environment() is None
    for key, value in SLURM_VARS.items():
        monkeypatch.setenv(key, value)
    env = slurm_environment()
    assert isinstance(env, SLURMEnvironment)
    assert env.auto_requeue is False  # Lightning would save inside its signal handler, mid-step
    assert env.world_size() == 1 and env.global_rank() == 0 and env.job_id() == 777
    monkeypatch.setenv(
        "SLURM_JOB_NAME", "interactive"
    )  # `srun --pty bash`-style sessions are not jobs to requeue
    assert slurm_environment() is None


def test_slurm_environment_steps_aside_for_torchrun_inside_an_allocation(monkeypatch):
    """``srun torchrun --nproc-per-node=8 train.py``: the SLURM variables describe the one srun task per node, not
    torchrun's processes, so the environment must be Lightning's TorchElasticEnvironment."""
    for key, value in SLURM_VARS.items():
        monkeypatch.setenv(key, value)
    torchrun = {"TORCHELASTIC_RUN_ID": "aero", "RANK": "3", "LOCAL_RANK": "3", "GROUP_RANK": "0",
                "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # fmt: skip
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect() and TorchElasticEnvironment.detect()
    assert slurm_environment() is None
    trainer = L.Trainer(accelerator="cpu", devices=8, strategy="ddp", logger=False, plugins=None)
    assert isinstance(trainer._accelerator_connector.cluster_environment, TorchElasticEnvironment)
    assert trainer.global_rank == 3 and trainer.world_size == 8
