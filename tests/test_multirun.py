"""Hydra multirun: two tiny jobs through the basic (local) launcher; the ablation experiments sweep by themselves
(their arms, and a real CPU multirun of each with the tiny model); the SLURM launcher config renders the sbatch
script submitit would submit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.ssl_tiny import build_tiny_ssl  # noqa: E402
from helpers.tiny import build_tiny
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from aero_lightning.data.audio_tokens import SAMPLE_RATE_HZ, AudioTokenCounter
from aero_lightning.data.synth import build_demo_corpus
from aero_lightning.model.tiny import corpus_texts

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirun")
    corpus = root / "corpus"
    build_demo_corpus(corpus, num_train=24, num_val=4, num_test=4, seed=0, shard_size=8, progress=False)
    model = root / "model"
    build_tiny(model, corpus_texts(corpus))
    return root, corpus, model


def _multirun(*overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "AERO_ROOT"}
    return subprocess.run(
        [sys.executable, "train.py", "-m", *overrides],
        cwd=ROOT,
        env=env | {"HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _tiny(corpus: Path, model: Path) -> list[str]:
    """CPU-sized overrides: tiny model and corpus, one batch through fit, validation and test."""
    return [
        f"paths.demo_corpus_dir={corpus}",
        f"paths.demo_model_dir={model}",
        "data.num_workers=0",
        "data.eval_batch_size=4",
        "trainer.enable_progress_bar=false",
        "trainer.fast_dev_run=true",
        "module.max_new_tokens=8",
        "hydra/launcher=basic",
    ]


def _jobs(sweep: Path) -> dict[int, dict]:
    """``{job number: result.json}`` of a sweep folder (``<sweep>/<num>/``)."""
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/result.json")}


def test_two_tiny_jobs_through_the_basic_launcher(demo_env, tmp_path):
    _, corpus, model = demo_env
    sweep = tmp_path / "sweep"
    proc = _multirun(
        "experiment=demo",
        *_tiny(corpus, model),
        "data.packing.packing_length=400",
        "data.packing.buffer_size=16",
        f"hydra.sweep.dir={sweep}",
        "seed=1,2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert sorted(jobs) == [0, 1]
    for num, seed in ((0, 1), (1, 2)):
        assert jobs[num]["output_dir"] == str(sweep / str(num))
        assert jobs[num]["test"]["num_samples"] == 4
        assert yaml.safe_load((sweep / str(num) / "config.yaml").read_text())["seed"] == seed
        overrides = yaml.safe_load((sweep / str(num) / ".hydra" / "overrides.yaml").read_text())
        assert f"seed={seed}" in overrides


# ------------------------------------------------------------------------------------------------ ablations
def _sweep_jobs(experiment: str) -> list[list[str]]:
    """The job overrides Hydra's basic sweeper makes of an experiment's ``hydra.sweeper.params``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return [list(job) for batch in batches for job in batch]


def _job_config(experiment: str, job: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *job], return_hydra_config=True)


def test_ablation_packing_sweeps_padded_4096_and_packed_32768():
    jobs = _sweep_jobs("ablation_packing")
    assert jobs == [["ablation.arm=padded"], ["ablation.arm=packed"]]
    arms = [_job_config("ablation_packing", job).data.packing for job in jobs]
    assert [(a.mode, a.packing_length) for a in arms] == [("padded", 4096), ("packed", 32768)]
    cfg = _job_config("ablation_packing", jobs[0])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.nodes == 1
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8
    assert cfg.strategy.stage == 2 and cfg.trainer.precision == "bf16-mixed"  # otherwise the aero_full recipe


def test_ablation_packing_arms_train_equal_tokens_per_step_on_the_same_samples():
    """Token slots per optimizer step (tokens per micro-batch x accumulate_grad_batches x devices x nodes) are
    equal; both arms filter samples the same way, and that filter keeps only samples that fit the padded arm's 4096
    with room for the text; validation falls on the same optimizer steps; the padded arm pads the encoder windows."""
    arms = {
        job[0].split("=")[1]: _job_config("ablation_packing", job) for job in _sweep_jobs("ablation_packing")
    }
    per_step = {}
    for name, cfg in arms.items():
        t = cfg.trainer
        per_step[name] = cfg.data.packing.packing_length * t.accumulate_grad_batches * t.devices * t.num_nodes
    assert per_step == {"padded": 4096 * 8 * 8, "packed": 32768 * 1 * 8}
    assert per_step["padded"] == per_step["packed"]
    assert {name: cfg.trainer.accumulate_grad_batches for name, cfg in arms.items()} == {
        "padded": 8,
        "packed": 1,
    }
    assert {name: cfg.model.encoder.padding_free for name, cfg in arms.items()} == {
        "padded": False,
        "packed": True,
    }
    # the same filter: no sample is kept by one arm's budget and dropped by the other's
    assert arms["padded"].data.max_duration_s == arms["packed"].data.max_duration_s == 120.0
    aero_tokens = AudioTokenCounter(
        encoder_downsample=2, projector_downsample=arms["packed"].model.projector.pool
    )
    assert aero_tokens(int(120.0 * SAMPLE_RATE_HZ)) == 3000  # 25 audio tokens per second
    assert 4096 - 3000 == 1096  # tokens left for the chat template and the text in the padded arm
    # validation every 500 optimizer steps in both arms (Lightning counts val_check_interval in micro-batches)
    assert {n: c.trainer.val_check_interval / c.trainer.accumulate_grad_batches for n, c in arms.items()} == {
        "padded": 500,
        "packed": 500,
    }
    assert all(cfg.trainer.max_steps == 2000 for cfg in arms.values())


def test_ablation_zero_sweeps_stages_1_2_3():
    jobs = _sweep_jobs("ablation_zero")
    assert jobs == [[f"strategy=deepspeed_zero{s}"] for s in (1, 2, 3)]
    stages = [_job_config("ablation_zero", job).strategy.stage for job in jobs]
    assert stages == [1, 2, 3]


def test_ablation_encoder_sweeps_whisper_hubert_wav2vec2():
    jobs = _sweep_jobs("ablation_encoder")
    assert len(jobs) == 3
    encoders = [_job_config("ablation_encoder", job).model.encoder for job in jobs]
    assert [e.get("type", "whisper") for e in encoders] == ["whisper", "hubert", "wav2vec2"]
    assert [e.name_or_path for e in encoders] == [
        "openai/whisper-large-v3",
        "facebook/hubert-large-ll60k",
        "facebook/wav2vec2-large-lv60",
    ]
    for job in jobs:  # choosing an encoder is only model/encoder=NAME
        assert (
            _job_config("ablation_encoder", job).model._target_
            == "aero_lightning.model.build.build_aero_model"
        )


def _cpu_aero(corpus: Path, model: Path) -> list[str]:
    """Shrink an aero_full-based experiment to the tiny model on CPU (one process, fp32, no DeepSpeed)."""
    return [
        *_tiny(corpus, model),
        "model/encoder=demo_tiny",
        "model/llm=demo_tiny",
        "model/projector=mlp_stack",
        "data=demo",
        "model.liger=false",
        "model.gradient_checkpointing=false",
        "strategy=auto",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=1",
        "trainer.num_nodes=1",
    ]


def test_ablation_packing_multirun_runs_both_arms_on_cpu(demo_env, tmp_path):
    """`python train.py -m experiment=ablation_packing` with the tiny model: the experiment's own sweep runs."""
    _, corpus, model = demo_env
    sweep = tmp_path / "packing"
    proc = _multirun("experiment=ablation_packing", *_cpu_aero(corpus, model), f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_jobs(sweep)) == [0, 1]
    configs = [yaml.safe_load((sweep / str(n) / "config.yaml").read_text()) for n in (0, 1)]
    assert [(c["data"]["packing"]["mode"], c["data"]["packing"]["packing_length"]) for c in configs] == [
        ("padded", 4096),
        ("packed", 32768),
    ]
    assert [c["trainer"]["accumulate_grad_batches"] for c in configs] == [8, 1]
    assert [c["model"]["encoder"]["padding_free"] for c in configs] == [False, True]


def test_ablation_encoder_multirun_trains_whisper_and_hubert_on_cpu(demo_env, tmp_path):
    """The ablation_encoder experiment through train.py with a tiny Whisper and a tiny HuBERT encoder: fit,
    validation and test decoding run for both (the HuBERT arm reads raw waveforms)."""
    _, corpus, model = demo_env
    hubert = build_tiny_ssl(tmp_path / "hubert", "hubert")
    sweep = tmp_path / "encoder"
    arms = (
        f"{{type:whisper,name_or_path:{model}/encoder,expect:null}},"
        f"{{type:hubert,name_or_path:{hubert},attn_implementation:sdpa,expect:null}}"
    )
    proc = _multirun(
        "experiment=ablation_encoder",
        *_cpu_aero(corpus, model),
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.params=null",  # instead of the hub checkpoints, these two tiny arms:
        f"++model.encoder={arms}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert sorted(jobs) == [0, 1]
    assert all(j["test"]["num_samples"] == 4 for j in jobs.values())
    assert "AeroModel with a hubert encoder" in (sweep / "1" / "train.log").read_text()


# ------------------------------------------------------------------------------------------------ SLURM launcher
def test_aero_slurm_launcher_submits_through_the_submitit_plugin(tmp_path, monkeypatch):
    """hydra/launcher=aero_slurm through the real hydra-submitit-launcher plugin and submitit, up to ``sbatch``
    (a fake that records the script): one task per GPU, 12 CPUs per task for srun too (SRUN_CPUS_PER_TASK), all of
    the node's memory, SIGUSR1 300 s before the end (not submitit's USR2), requeueable, appended logs."""
    submitit = pytest.importorskip("submitit")
    from hydra.utils import instantiate

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch.json"
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit looks for srun to accept cluster="slurm"
    (bin_dir / "sbatch").write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'script': pathlib.Path(sys.argv[-1]).read_text()}}, open({str(record)!r}, 'w'))\n"
        "print('Submitted batch job 4242')\n"
    )
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    # the plugin waits for every job's result; the fake jobs never run
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda self: [None])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=ablation_packing",
                "hydra.launcher.partition=h100",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__module__ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher"
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch(_sweep_jobs("ablation_packing"), initial_job_idx=0) == [None, None]

    submitted = json.loads(record.read_text())
    assert len(submitted["argv"]) == 1  # sbatch <script>
    lines = submitted["script"].splitlines()
    flags = {line for line in lines if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --partition=h100",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --export=ALL,SRUN_CPUS_PER_TASK=12",
        "#SBATCH --mem=0GB",
        "#SBATCH --time=1440",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --array=0-1%2",  # the two arms, one array task each, both at once
        "#SBATCH --job-name=ablation_packing",
    } <= flags
    assert not any("USR2" in f for f in flags)  # submitit's own signal, whose handler would resubmit
    assert len([f for f in flags if f.startswith("#SBATCH --signal")]) == 1
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in srun[0]
