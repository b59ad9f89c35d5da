"""experiment=librispeech_1gpu: the one-GPU recipe states Whisper-small + Qwen2.5-0.5B and its estimates, and its
walkthrough (prepare every LibriSpeech split, train, evaluate) runs on the CPU with tiny components."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from helpers.aero_runs import compose_train
from helpers.tiny import build_tiny
from hydra import compose, initialize_config_dir

from aero_lightning.data import prepare
from aero_lightning.data.corpora import get_corpus
from aero_lightning.errors import check_group_overrides

ROOT = Path(__file__).resolve().parents[1]
SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
TEXTS = ["HELLO WORLD", "THE CAT SAT ON THE MAT", "A QUICK BROWN FOX"]


def _estimate_module():
    spec = importlib.util.spec_from_file_location(
        "estimate", ROOT / "experiments" / "librispeech_1gpu" / "estimate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_states_whisper_small_and_qwen2_5_0_5b_on_one_gpu(tmp_path):
    cfg = compose_train(tmp_path, ("experiment=librispeech_1gpu",))
    encoder, llm = cfg.model.encoder, cfg.model.llm
    assert (encoder.name_or_path, llm.name_or_path) == ("openai/whisper-small", "Qwen/Qwen2.5-0.5B-Instruct")
    assert dict(encoder.expect) == {"d_model": 768, "encoder_layers": 12, "num_mel_bins": 80}
    assert dict(llm.expect) == {"hidden_size": 896, "num_hidden_layers": 24}
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.precision) == (1, 1, "bf16-mixed")
    assert cfg.strategy.get("name", "auto") == "auto"
    assert cfg.model.projector._target_.endswith("AvgPoolProjector") and cfg.model.projector.pool == 2
    train_dirs = sorted(Path(c.dir).name for c in cfg.data.train.values())
    assert train_dirs == ["train-clean-100", "train-clean-360", "train-other-500"]
    assert sorted(Path(d).name for d in cfg.data.val_dirs.values()) == ["dev-clean", "dev-other"]
    assert Path(cfg.data.test_dir).name == "test-clean"
    assert cfg.data.packing.packing_length * cfg.trainer.accumulate_grad_batches == 32768


def test_the_estimates_in_the_readme_and_the_config_are_the_estimators(tmp_path):
    estimate = _estimate_module()
    cfg = compose_train(tmp_path, ("experiment=librispeech_1gpu",))
    e = estimate.estimate(
        packing_length=cfg.data.packing.packing_length,
        accumulate=cfg.trainer.accumulate_grad_batches,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        max_steps=cfg.trainer.max_steps,
    )
    assert e == estimate.estimate()  # the estimator's defaults are the recipe
    assert 580e6 < e["params"] < 590e6  # Whisper-small's encoder (88 M) + Qwen2.5-0.5B (494 M) + projector
    assert e["tokens_per_step"] == 32_636 and e["docs_per_row"] == 41
    readme = (ROOT / "experiments" / "librispeech_1gpu" / "README.md").read_text(encoding="utf-8")
    assert estimate.table() in readme
    recipe = (ROOT / "conf" / "experiment" / "librispeech_1gpu.yaml").read_text(encoding="utf-8")
    assert f"~{e['step_s']:.2f} s per step" in recipe and f"peak memory ~{e['memory_gib']:.0f} GiB" in recipe
    assert f"{e['flops_per_step']:.2e} model FLOPs per step".replace("e+", "e") in recipe


def test_every_librispeech_split_name_maps_to_the_hub_dataset():
    splits = get_corpus("librispeech").hf_splits
    assert [splits[s] for s in SPLITS] == [
        "train.clean.100", "train.clean.360", "train.other.500", "validation.clean", "validation.other",
        "test.clean", "test.other",
    ]  # fmt: skip


def _librispeech_layout(root: Path, split: str, seed: int) -> Path:
    """A LibriSpeech-layout folder of one subset: 3 utterances of tones, with their transcript file."""
    rng = np.random.default_rng(seed)
    folder = root / split / "19" / "198"
    folder.mkdir(parents=True)
    lines = []
    for i, text in enumerate(TEXTS):
        key = f"19-198-{i:04d}"
        seconds = 1.0 + 0.5 * i
        t = np.arange(round(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 400) * t) + 0.01 * rng.standard_normal(t.size)
        sf.write(folder / f"{key}.flac", wave.astype(np.float32), 16000)
        lines.append(f"{key} {text}")
    (folder / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root / split


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_walkthrough_runs_on_the_cpu_with_tiny_components(tmp_path, capsys):
    """prepare every split (as the README's loop does) -> verify -> train.py experiment=librispeech_1gpu with tiny
    components for 2 steps -> eval.py on test-clean from the LibriSpeech folder."""
    source = tmp_path / "LibriSpeech"
    for i, split in enumerate(SPLITS):
        _librispeech_layout(source, split, seed=i)
    data = tmp_path / "data_cache"
    for split in SPLITS:
        prepare.main(
            ["corpus=librispeech", f"source={source / split}", f"out={data / 'librispeech' / split}", f"split={split}",
             "workers=1", "progress=false"]
        )  # fmt: skip
    results = prepare.main(["verify", str(data / "librispeech")])
    assert [r["ok"] for r in results] == [True] * 7 and [r["num_samples"] for r in results] == [3] * 7
    capsys.readouterr()

    components = build_tiny(tmp_path / "tiny", [*TEXTS, "Please recognize the speech"] * 4)
    run = tmp_path / "outputs" / "librispeech_1gpu"
    proc = _run(
        "train.py",
        "experiment=librispeech_1gpu",
        f"paths.data_dir={data}",
        f"model.encoder.name_or_path={components / 'encoder'}",
        f"model.llm.name_or_path={components / 'llm'}",
        "model.encoder.expect.d_model=64",  # the tiny shapes; the 80 mel bins are Whisper-small's
        "model.encoder.expect.encoder_layers=2",
        "model.llm.expect.hidden_size=64",
        "model.llm.expect.num_hidden_layers=2",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "data.packing.packing_length=1024",
        "data.packing.buffer_size=8",
        "data.num_workers=0",
        "data.eval_batch_size=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.wer.every_n_train_steps=0",
        "module.max_new_tokens=8",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((run / "result.json").read_text())
    assert result["test"]["num_samples"] == 3 and result["last_checkpoint"].endswith("last.ckpt")
    spec = json.loads((run / "model" / "aero_model.json").read_text())
    assert spec["projector"] == {"type": "avgpool_linear", "pool": 2}

    out = tmp_path / "eval"
    proc = _run(
        "eval.py",
        f"ckpt={run}",
        "benchmark=librispeech_test_clean",
        f"benchmark.librispeech_test_clean.source={source / 'test-clean'}",
        "generation.max_new_tokens=4",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["librispeech_test_clean"]["num_samples"] == 3


def _walkthrough_commands() -> list[list[str]]:
    """The ``python ...`` commands of the README's walkthrough, continuation lines joined, split as a shell does."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From the demo to a real model on one GPU", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().split("  #", 1)[0]
            if line.startswith("python "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_readme_walkthrough_names_every_split_and_its_commands_compose(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"for split in {' '.join(SPLITS)}; do" in readme
    cfg = compose_train(tmp_path, ("experiment=librispeech_1gpu",))
    used = [Path(c.dir) for c in cfg.data.train.values()] + [Path(d) for d in cfg.data.val_dirs.values()]
    assert {p.name for p in [*used, Path(cfg.data.test_dir)]} <= set(SPLITS)
    assert {p.parent for p in used} == {Path(cfg.paths.data_dir) / "librispeech"}  # the loop's out= folders
    commands = _walkthrough_commands()
    scripts = [c[0] if c[0] != "-m" else c[1] for c in commands]
    assert scripts == [
        "aero_lightning.data.prepare", "aero_lightning.data.prepare", "train.py", "train.py", "eval.py",
        "transcribe.py", "aero_lightning.hf.export",
    ]  # fmt: skip
    for command in commands:
        if command[0] in ("train.py", "eval.py", "transcribe.py"):
            check_group_overrides(ROOT / "conf", command[1:])
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                composed = compose(command[0].removesuffix(".py"), overrides=command[1:])
            if command[0] == "eval.py":
                assert sorted(composed.benchmark) == ["librispeech_test_clean", "librispeech_test_other"]
                assert composed.benchmark.librispeech_test_other.source == "/data/LibriSpeech/test-other"
    assert prepare.parse_args(commands[0][2:]) | {"source": "x"} == {
        "corpus": "librispeech", "source": "x", "out_dir": "data_cache/librispeech/$split", "split": "$split",
        "workers": 8,
    }  # fmt: skip
