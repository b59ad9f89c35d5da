"""A trained run folder is self-contained: moved elsewhere, with the corpus and the component folders it was built
from deleted, `eval.py`, `transcribe.py` and the export still load it and give the text they gave before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch
from helpers.aero_runs import SENTENCES, speak
from helpers.tiny import build_tiny
from transformers import AutoTokenizer

from aero_lightning.data.synth import build_demo_corpus
from aero_lightning.model.tiny import corpus_texts

ROOT = Path(__file__).resolve().parents[1]
GENERATION = ["generation.max_new_tokens=12"]


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, *(["-m", script] if "." in script and not script.endswith(".py") else [script])]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _transcripts(path: Path) -> dict[str, str]:
    return {Path(r["path"]).name: r["text"] for r in map(json.loads, path.read_text().splitlines())}


def _hypotheses(eval_dir: Path) -> dict[str, str]:
    lines = (eval_dir / "predictions" / "demo.jsonl").read_text().splitlines()
    return {r["key"]: r["hypothesis"] for r in map(json.loads, lines)}


def _visible_replies(run: Path) -> None:
    """Zero the (tied) embedding rows of special and whitespace-only tokens in the run's checkpoint, so that the
    2-step model's greedy replies are visible text rather than tokens decoding strips: equal texts then mean
    something."""
    tokenizer = AutoTokenizer.from_pretrained(run / "model" / "llm")
    blank = [
        i
        for i in range(len(tokenizer))
        if i in tokenizer.all_special_ids or not tokenizer.decode([i]).strip()
    ]
    ckpt = (run / "checkpoints" / "last.ckpt").resolve()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for name in ("model.llm.model.embed_tokens.weight", "model.llm.lm_head.weight"):
        if name in state["state_dict"]:
            state["state_dict"][name][blank] = 0.0
    torch.save(state, ckpt)


def test_a_moved_run_evaluates_transcribes_and_exports_without_its_sources(tmp_path):
    corpus, components = tmp_path / "corpus", tmp_path / "components"
    build_demo_corpus(corpus, num_train=16, num_val=2, num_test=3, seed=0, shard_size=8, progress=False)
    build_tiny(components, corpus_texts(corpus))
    run = tmp_path / "outputs" / "run"
    _ok(
        _run(
            "train.py",
            "experiment=demo",
            f"paths.demo_corpus_dir={corpus}",
            f"paths.demo_model_dir={components}",
            f"hydra.run.dir={run}",
            "data.num_workers=0",
            "data.packing.packing_length=400",
            "data.packing.buffer_size=16",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "run_test=false",
        )
    )
    assert (run / "model" / "aero_model.json").is_file()
    _visible_replies(run)
    test_split = shutil.copytree(corpus / "test", tmp_path / "kept" / "test")  # the benchmark, kept apart
    audio = tmp_path / "kept" / "audio"
    audio.mkdir()
    for i, sentence in enumerate(SENTENCES[:2]):
        sf.write(audio / f"s{i}.wav", speak(sentence, i), 16000)

    def use(run_dir: Path, tag: str) -> tuple[dict[str, str], dict[str, str]]:
        out = tmp_path / tag
        _ok(
            _run(
                "transcribe.py",
                f"ckpt={run_dir}",
                f"audio={audio}",
                f"output={out / 'transcripts.jsonl'}",
                f"hydra.run.dir={out / 'transcribe'}",
                *GENERATION,
            )
        )
        _ok(
            _run(
                "eval.py",
                f"ckpt={run_dir}",
                f"benchmark.demo.source={test_split}",
                f"hydra.run.dir={out / 'eval'}",
                *GENERATION,
            )
        )
        return _transcripts(out / "transcripts.jsonl"), _hypotheses(out / "eval")

    transcripts, hypotheses = use(run, "before")
    assert len(transcripts) == 2 and len(hypotheses) == 3
    assert any(transcripts.values()) or any(
        hypotheses.values()
    )  # the comparison is not between empty strings

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    shutil.rmtree(corpus)
    shutil.rmtree(components)
    assert not (
        moved / "model" / "encoder" / "model.safetensors"
    ).exists()  # configs only: weights are in ckpts

    assert use(moved, "after") == (transcripts, hypotheses)
    exported = tmp_path / "exported"
    _ok(_run("aero_lightning.hf.export", f"ckpt={moved}", f"out={exported}"))
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(exported), trust_remote_code=True)
    texts = {name: asr(str(audio / name), max_new_tokens=12)["text"] for name in transcripts}
    assert texts == transcripts
