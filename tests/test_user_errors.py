"""User errors at the entry points: one `error:` line, exit status 2, no traceback; each CLI's own --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from aero_lightning.data import prepare
from aero_lightning.errors import UnknownNameError, UserError, check_group_overrides
from aero_lightning.eval.benchmarks import get_benchmark
from aero_lightning.hf import export

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, script, *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a failed run; asserts there is no traceback."""
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("eval.py", ("ckpt={tmp}/no_such_run", "benchmark.demo.source={tmp}/items.jsonl"), "error: checkpoint "
         "{tmp}/no_such_run does not exist; give a Lightning .ckpt, a training run folder (with checkpoints/last.ckpt) "
         "or a folder written by save_pretrained"),
        ("eval.py", ("ckpt={tmp}", "benchmark=librispeech_test_cleen"), "error: unknown benchmark "
         "'librispeech_test_cleen'; known: air_bench_chat, "),
        ("eval.py", ("benchmark.demo.source={tmp}/items.jsonl",), "error: ckpt= is required (e.g. ckpt=PATH); see "
         "--help"),
        ("eval.py", ("ckpt={tmp}/no_such_run", "benchmark.demo.source={tmp}/no_such_set"), "error: benchmark source "
         "{tmp}/no_such_set does not exist"),
        ("transcribe.py", ("ckpt={tmp}/no_such_run", "audio={tmp}/a.wav"), "error: checkpoint {tmp}/no_such_run "
         "does not exist"),
        ("train.py", ("experiment=demo", "paths.demo_corpus_dir={tmp}/no_corpus"), "error: data folder "
         "{tmp}/no_corpus/train does not exist; build the demo corpus with"),
        ("train.py", ("experiment=demo_tiny",), "error: unknown experiment 'demo_tiny'; known: ablation_encoder, "),
    ],
    ids=["eval-missing-ckpt", "eval-unknown-benchmark", "eval-no-ckpt", "eval-missing-source", "transcribe-missing-ckpt",
         "train-missing-data", "train-unknown-experiment"],
)  # fmt: skip
def test_hydra_entry_points_report_user_errors_in_one_line_and_exit_2(script, args, expected, tmp_path):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    (tmp_path / "items.jsonl").write_text('{"audio": "a.wav", "text": "silence"}\n')
    proc = _run(script, *(a.format(tmp=tmp_path) for a in args), tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _one_error_line(proc.stderr).startswith(expected.format(tmp=tmp_path))


@pytest.mark.parametrize(
    ("main", "args", "expected"),
    [
        (prepare.main, ["corpus=libri", "out={tmp}/out"], "error: unknown corpus 'libri'; known corpora: ami_ihm, "),
        (prepare.main, ["corpus=librispeech", "source={tmp}/LibriSpeech", "out={tmp}/out"],
         "error: source folder {tmp}/LibriSpeech does not exist\n"),
        (prepare.main, ["verify", "{tmp}/nothing"], "error: No manifest.json in "),
        (export.main, ["ckpt={tmp}/no_such_run", "out={tmp}/hf"], "error: checkpoint {tmp}/no_such_run does not "
         "exist"),
    ],
    ids=["prepare-unknown-corpus", "prepare-missing-source", "verify-missing-split", "export-missing-ckpt"],
)  # fmt: skip
def test_key_value_entry_points_report_user_errors_in_one_line_and_exit_2(
    main, args, expected, tmp_path, capsys
):
    with pytest.raises(SystemExit) as info:
        main([a.format(tmp=tmp_path) for a in args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected.format(tmp=tmp_path)) and err.count("\n") == 1


def test_group_overrides_are_checked_against_the_config_folders(capsys):
    check_group_overrides(
        CONF, ["experiment=demo", "model/encoder=demo_tiny", "trainer.max_steps=3", "--cfg", "job"]
    )
    check_group_overrides(CONF, ["benchmark=[ami,tedlium]", "benchmark.ami.source=x", "hydra.run.dir=y"])
    for argv, message in [
        (["benchmark=[ami,tedlum]"], "error: unknown benchmark 'tedlum'; known: air_bench_chat, "),
        (["model/encoder=whisper_tiny"], "error: unknown model.encoder 'whisper_tiny'; known: demo_tiny, "),
        (["-m", "strategy=ddp,zero9"], "error: unknown strategy 'zero9'; known: auto, ddp, "),
    ]:
        with pytest.raises(SystemExit) as info:
            check_group_overrides(CONF, argv)
        assert info.value.code == 2
        assert capsys.readouterr().err.startswith(message)


def test_unknown_names_are_user_errors_with_a_plain_message():
    with pytest.raises(UnknownNameError) as info:
        get_benchmark("nosuch")
    assert isinstance(info.value, (UserError, KeyError))
    assert str(info.value).startswith("unknown benchmark 'nosuch'; known: ")  # not the repr a KeyError prints


# --------------------------------------------------------------------------------------------------- --help


def _help_template(name: str, *overrides: str) -> tuple[str, object]:
    """The ``hydra.help.template`` of an entry point's config, and the composed config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.help.template, cfg


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` exists in ``cfg``, without resolving interpolations on the way."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def _documented_keys(template: str) -> list[str]:
    """The ``key`` of every option line of a help text (``  key=VALUE   description``)."""
    return re.findall(r"^ +([\w./]+)=\S*\s{2,}\S", template, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("train", ("experiment=demo",)), ("eval", ("ckpt=x",)), ("transcribe", ("ckpt=x", "audio=y"))],
)
def test_each_help_documents_keys_that_exist(name, overrides):
    template, cfg = _help_template(name, *overrides)
    keys = _documented_keys(template)
    assert len(keys) >= 13, keys
    for key in keys:
        if (CONF / key).is_dir():  # a config group (experiment=, model/encoder=, benchmark=)
            continue
        if key.startswith("benchmark.NAME."):
            assert key.removeprefix("benchmark.NAME.") in cfg.benchmark.demo, key
        elif key != "hydra.run.dir":
            assert _has_key(cfg, key), key


def test_train_help_lists_every_experiment_and_eval_help_every_benchmark():
    train_help, _ = _help_template("train")
    for experiment in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        assert re.search(rf"\b{experiment}\b", train_help), experiment
    for group in ("model/encoder", "model/llm", "model/projector", "strategy", "data"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            assert re.search(rf"\b{option}\b", train_help), (group, option)
    eval_help, _ = _help_template("eval", "ckpt=x")
    for benchmark in sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml")):
        short = benchmark.removeprefix("air_bench_foundation")  # the three parts are listed as _sound, ...
        assert re.search(rf"\b{benchmark}\b", eval_help) or short in eval_help, benchmark


@pytest.mark.parametrize("script", ["train.py", "eval.py", "transcribe.py"])
def test_help_shows_the_entry_points_own_options_not_every_config_group(script, tmp_path):
    proc = _run(script, "--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{script}: ")
    assert lines[2].startswith(f"Usage: python {script} ")
    assert "Main options:" in lines
    assert "== Configuration groups ==" not in proc.stdout and "Powered by Hydra" not in proc.stdout
    assert "hydra/launcher" not in proc.stdout and "_target_" not in proc.stdout
