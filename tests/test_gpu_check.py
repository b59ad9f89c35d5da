"""``benchmarks/gpu_check.sh`` (``make gpu-check``): its CPU dry run end to end, its exit without CUDA, and the
configuration its GPU run composes (which only a GPU machine runs), so that the script cannot rot unnoticed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
_spec.loader.exec_module(gpu_check)

DRY_STEPS = [
    "environment",
    "pytest_gpu",
    "corpus",
    "components",
    "train_zero2",
    "transcribe",
    "train_zero3",
    "train_fsdp2",
    "mfu",
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTEST_"))}
    return env | {"GPU_CHECK_PYTHON": sys.executable}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``benchmarks/gpu_check.sh --dry-run`` once: (exit status, stdout, results JSON, workdir)."""
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "result.json"
    proc = subprocess.run(
        # the synthetic corpus: a GPU machine without espeak-ng takes that path (espeak-ng's is data.synth's own CLI)
        [
            "bash",
            str(SCRIPT),
            "--dry-run",
            "--corpus",
            "synthetic",
            "--workdir",
            str(root / "work"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]

    def not_json(constant):
        raise AssertionError(f"{out} holds {constant}, which is not JSON")

    return proc.returncode, proc.stdout, json.loads(out.read_text(), parse_constant=not_json), root / "work"


def test_dry_run_runs_every_step_and_reports_them(dry_run):
    code, stdout, result, work = dry_run
    rows = {r["step"]: r for r in result["rows"]}
    statuses = {step: rows[step]["status"] for step in rows}
    failed = {s: (rows[s]["note"], rows[s]["log_tail"]) for s in rows if rows[s]["status"] != "ok"}
    assert list(rows) == DRY_STEPS
    assert statuses == dict.fromkeys(DRY_STEPS, "ok") | {"train_zero3": "skipped (needs CUDA)"}, failed
    assert code == 0
    assert result["dry_run"] is True and result["device"] == "cpu (dry run)" and result["ok"] is True
    assert result["failed"] == []
    # the printed table is the JSON's, one line per step
    assert result["table"] in stdout
    assert "cpu (dry run): 8 ok, 1 skipped, 0 failed in " in stdout
    table_rows = [line for line in result["table"].splitlines()[2:]]
    assert [line.split(" | ")[0].lstrip("| ") for line in table_rows] == DRY_STEPS
    # the big artefacts are removed without --keep, the logs stay
    assert not (work / "components").exists()
    assert not (work / "runs" / "train_zero2" / "checkpoints").exists()
    assert (work / "logs" / "train_zero2.log").exists()


def test_dry_run_numbers(dry_run):
    _, _, result, _ = dry_run
    rows = {r["step"]: r for r in result["rows"]}
    env = rows["environment"]["numbers"]
    assert env["cuda_available"] is False  # the dry run hides every GPU
    assert env["varlen"] == "ok" and env["torch"] == torch.__version__
    tests = rows["pytest_gpu"]["numbers"]
    assert tests["failed"] == tests["errors"] == tests["passed"] == 0 and tests["skipped"] >= 4
    assert sorted(rows["mfu"]["numbers"]["rows"]) == ["packed 1024, liger off", "padded 512, liger off"]
    corpus = rows["corpus"]["numbers"]
    assert (corpus["train"], corpus["validation"], corpus["test"]) == gpu_check.DRY_PLAN.corpus
    assert corpus["source"] == "synthetic waveforms" + (
        "" if shutil.which("espeak-ng") else " (no espeak-ng)"
    )
    components = rows["components"]["numbers"]
    assert components["llm_vocab"] == 512 and components["tokenizer_size"] < 512  # embedding rows > tokenizer
    zero2, fsdp2 = rows["train_zero2"]["numbers"], rows["train_fsdp2"]["numbers"]
    assert zero2["global_step"] == gpu_check.DRY_PLAN.zero2_steps == 4
    assert zero2["wer_evals"] == 2 and 0 <= zero2["val_wer"] and zero2["test_wer"] is not None
    assert fsdp2["global_step"] == gpu_check.DRY_PLAN.short_steps == 2 and fsdp2["wer_evals"] == 1
    assert Path(fsdp2["checkpoint"]).name == "last.ckpt"
    assert "strategy=ddp" in rows["train_zero2"]["note"]
    assert "strategy=fsdp2" in rows["train_fsdp2"]["command"]
    transcribe = rows["transcribe"]["numbers"]
    assert transcribe["audio_s"] == 900.0 and transcribe["audio_tokens"] == 22_500  # one 15-minute pass
    assert 1 <= transcribe["new_tokens"] <= gpu_check.DRY_PLAN.transcribe_new_tokens
    assert transcribe["model"].startswith("checkpoint ")  # the train_zero2 run's checkpoint


def test_without_cuda_it_exits_at_once_with_a_clear_message(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert 'pip install -e ".[gpu,dev]"' in proc.stderr and f"torch=={gpu_check.TORCH_PIN}" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "r.json").exists()  # no step ran


def test_a_step_that_no_longer_fits_the_budget_is_skipped_not_started(tmp_path):
    """The budget is what keeps the GPU check under 10 minutes: a step starts only while the time it needs is left
    (10 s or more for every dry-run step), so with a 5 s budget none starts and each says why. Relative --workdir
    and --out are the caller's."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--budget-s", "5", "--workdir", "w", "--out", "r.json"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = json.loads(out.read_text())["rows"]
    assert proc.returncode == 0
    assert [(r["step"], r["status"]) for r in rows] == [(step, "skipped (time budget)") for step in DRY_STEPS]
    needed = {r["step"]: r["note"].rsplit(", ", 1)[1] for r in rows}
    assert needed == {s: f"{gpu_check.DRY_PLAN.caps[s][1]} s needed" for s in DRY_STEPS}
    assert all(r["seconds"] == 0 for r in rows) and not list((tmp_path / "w" / "logs").glob("*.log"))


def test_a_python_without_the_project_is_refused_with_the_install_command(tmp_path):
    python = shutil.which("python3", path="/usr/bin:/bin") or pytest.skip("no system python3")
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the system python has torch")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=ROOT,
        env=_env() | {"GPU_CHECK_PYTHON": python},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and 'pip install -e ".[gpu,dev]"' in proc.stderr


def test_pinned_torch_is_the_projects():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={gpu_check.TORCH_PIN}"' in text


def test_flash_attn_is_optional():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(d.startswith("flash-attn") for d in extras["gpu"])
    assert any(d.startswith("flash-attn") for d in extras["flash"])
    assert any(d.startswith("liger-kernel") for d in extras["gpu"]) and any(
        d.startswith("deepspeed") for d in extras["gpu"]
    )


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "strategy, steps, target, stage",
    [
        (None, 20, "aero_lightning.strategies.AeroDeepSpeedStrategy", 2),
        ("deepspeed_zero3", 3, "aero_lightning.strategies.AeroDeepSpeedStrategy", 3),
        ("fsdp2", 3, "aero_lightning.strategies.FSDP2Strategy", None),
    ],
)
def test_gpu_train_overrides_compose_to_aero_full_on_the_generated_data(
    tmp_path, strategy, steps, target, stage
):
    """The GPU run's train.py overrides (only a GPU machine runs them) compose to aero_full with the generated corpus
    and components, one GPU, bf16, Liger, and the requested strategy, validation WER and checkpoint."""
    plan = gpu_check.GPU_PLAN
    run_dir, corpus, components = tmp_path / "run", tmp_path / "corpus", tmp_path / "components"
    cfg = _compose(gpu_check.train_overrides(plan, False, run_dir, corpus, components, steps, strategy))
    assert cfg.hydra.run.dir == str(run_dir)
    assert cfg.task_name == "aero_full"
    assert cfg.model.encoder.name_or_path == str(components / "encoder")
    assert cfg.model.llm.name_or_path == str(components / "llm")
    assert dict(cfg.model.encoder.expect) == {"d_model": 1280, "encoder_layers": 32, "num_mel_bins": 128}
    assert dict(cfg.model.llm.expect) == {"hidden_size": 1536, "num_hidden_layers": 28}
    assert cfg.model.liger is True and cfg.model.gradient_checkpointing is True
    assert {k: dict(v) for k, v in cfg.data.train.items()} == {
        "gpu_check": {"dir": str(corpus / "train"), "weight": 1.0}
    }
    assert dict(cfg.data.val_dirs) == {"gpu_check": str(corpus / "validation")}
    assert cfg.data.test_dir == str(corpus / "test")
    assert cfg.data.packing.mode == "packed" and cfg.data.packing.packing_length == 32768
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.accelerator) == (1, 1, "gpu")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.max_steps == steps
    val_every = min(plan.val_every, steps)
    assert cfg.trainer.val_check_interval == val_every and cfg.callbacks.wer.every_n_train_steps == val_every
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == steps
    assert cfg.callbacks.wer.generation.max_new_tokens == plan.decode_new_tokens
    assert cfg.strategy._target_ == target
    if stage is not None:
        assert cfg.strategy.stage == stage
    else:
        assert cfg.module._target_ == "aero_lightning.strategies.FSDP2AeroLitModule"


@pytest.mark.parametrize("shape", ["aero", "tiny"])
def test_generated_components_pass_the_architecture_checks_the_overrides_set(tmp_path, shape):
    """The configs the components are built from (benchmarks/mfu.py's) satisfy ``model.*.expect`` as the overrides
    set them, so that the GPU run's ``from_pretrained`` checks pass at Aero's shapes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mfu

    from aero_lightning.model.build import check_architecture
    from aero_lightning.model.tiny import tiny_whisper_config

    plan = gpu_check.GPU_PLAN if shape == "aero" else gpu_check.DRY_PLAN
    cfg = _compose(gpu_check.train_overrides(plan, shape == "tiny", tmp_path, tmp_path, tmp_path, 3, None))
    encoder = tiny_whisper_config(**(mfu.AERO_ENCODER if shape == "aero" else mfu.TINY_ENCODER))
    llm = mfu.aero_llm_config() if shape == "aero" else mfu.tiny_llm_config(512)
    check_architecture("encoder", encoder, cfg.model.encoder.expect)
    check_architecture("llm", llm, cfg.model.llm.expect)
    with pytest.raises(ValueError, match="hidden_size: expected"):
        check_architecture(
            "llm",
            mfu.tiny_llm_config(512) if shape == "aero" else mfu.aero_llm_config(),
            cfg.model.llm.expect,
        )
    if shape == "aero":
        assert llm.vocab_size == mfu.QWEN2_5_1_5B_VOCAB == 151_936
        assert (encoder.d_model, encoder.encoder_layers, encoder.encoder_attention_heads) == (1280, 32, 20)
        assert (llm.num_attention_heads, llm.num_key_value_heads, llm.intermediate_size) == (12, 2, 8960)


def test_drill_overrides_compose_with_the_batch_recorder(tmp_path):
    cfg = _compose(
        [
            o.replace("{{i}}", "0")
            for o in gpu_check.drill_overrides(
                gpu_check.GPU_PLAN, False, tmp_path / "run", tmp_path / "c", tmp_path / "m", 4
            )
        ]
    )
    assert cfg.trainer.devices == 4 and cfg.trainer.max_steps == gpu_check.DRILL_MAX_STEPS
    assert cfg.strategy.stage == 2  # aero_full's own ZeRO-2
    assert cfg.callbacks.recorder._target_ == "helpers.batch_recorder.BatchRecorder"
    assert cfg.callbacks.recorder.path == f"{tmp_path}/run0.rank{{rank}}.jsonl"
    assert cfg.run_test is False and cfg.trainer.limit_val_batches == 0
    assert sorted(cfg.callbacks.preemption.signals) == ["SIGTERM", "SIGUSR1"]


def test_sentences_pass_the_demo_corpus_filter_and_are_deterministic():
    from aero_lightning.data.synth import clean_sentences

    sentences = gpu_check.make_sentences(300)
    assert len(set(s.casefold() for s in sentences)) == 300
    assert sorted(clean_sentences(sentences)) == sorted(
        sentences
    )  # espeak-ng's corpus builder keeps them all
    assert gpu_check.make_sentences(300) == sentences


def test_synthetic_corpus_is_a_readable_deterministic_prepared_corpus(tmp_path):
    from aero_lightning.data.shard_reader import resolve_split
    from aero_lightning.model.tiny import corpus_texts

    sentences = tmp_path / "sentences.txt"
    texts = gpu_check.make_sentences(9)
    sentences.write_text("\n".join(texts) + "\n")
    digests = []
    for name in ("a", "b"):
        argv = [
            "--out",
            str(tmp_path / name),
            "--sentences",
            str(sentences),
            "--train",
            "5",
            "--val",
            "2",
            "--test",
            "2",
            "--shard-size",
            "2",
        ]
        gpu_check.sub_synthetic_corpus(argv)
        shards = sorted((tmp_path / name).rglob("*.tar"))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in shards])
    assert digests[0] == digests[1]  # byte-identical shards
    manifests = {
        s: json.loads((tmp_path / "a" / s / "manifest.json").read_text())
        for s in ("train", "validation", "test")
    }
    assert {s: m["num_samples"] for s, m in manifests.items()} == {"train": 5, "validation": 2, "test": 2}
    assert len(resolve_split(tmp_path / "a" / "train")) == 3  # 5 samples, 2 per shard
    # test first, then validation, then train, as the espeak-ng corpus cuts its splits
    assert set(texts[4:]) <= set(corpus_texts(tmp_path / "a", "train"))
    assert set(texts[:2]) <= set(corpus_texts(tmp_path / "a", "test"))


def test_results_are_strict_json():
    nan, inf = float("nan"), float("inf")
    assert gpu_check.strict_json({"a": [nan, 1.5, (inf, -inf)], "b": {"c": nan, "d": "x"}}) == {
        "a": [None, 1.5, [None, None]],
        "b": {"c": None, "d": "x"},
    }


def test_slugify_and_table():
    assert gpu_check.slugify("NVIDIA H200") == "nvidia_h200"
    assert gpu_check.slugify("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    rows = [gpu_check.Row("environment", "x", "ok", 1.25, note="a | b"), gpu_check.Row("mfu", "y")]
    table = gpu_check.render_table(rows).splitlines()
    assert table[2] == "| environment | ok | 1.2 |  | a / b |"
    assert table[3] == "| mfu | skipped | 0.0 |  |  |"


def test_unknown_skip_is_an_error():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "train_zero9"])
    args = gpu_check.parse_args(["--skip", "mfu,pytest_gpu"])
    assert args.skip == ["mfu", "pytest_gpu"] and args.budget_s == 570.0


@pytest.mark.slow
def test_dry_run_preemption_drill_on_two_processes(tmp_path):
    """``--devices 2``: SIGUSR1 in the middle of a backward pass on both ranks, three times; each gives an hpc
    checkpoint, each restart resumes from it, every step is trained exactly once, nothing hangs."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--dry-run",
            "--devices",
            "2",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--skip",
            "pytest_gpu,mfu,train_zero2,transcribe,train_fsdp2",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    result = json.loads(out.read_text())
    drill = {r["step"]: r for r in result["rows"]}["preemption_drill"]
    assert drill["status"] == "ok", (drill["note"], drill["log_tail"])
    assert proc.returncode == 0
    assert drill["numbers"] == {
        "devices": 2,
        "preemptions": 3,
        "ranks_signalled": [2, 2, 2],
        "hpc_checkpoints": ["hpc_ckpt_2.ckpt", "hpc_ckpt_4.ckpt", "hpc_ckpt_6.ckpt"],
        "resumes": 3,
        "steps_once": True,
        "final_step": gpu_check.DRILL_MAX_STEPS,
    }
