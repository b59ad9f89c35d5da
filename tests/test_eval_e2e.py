"""End to end through `python eval.py` on a tiny demo checkpoint, a tiny shard benchmark and a local
multiple-choice manifest: JSON summary, markdown table, predictions JSONL, RTFx."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import soundfile as sf
from helpers.aero_runs import speak, write_lightning_run
from helpers.tiny import build_tiny

from aero_lightning.data.synth import build_demo_corpus
from aero_lightning.model.tiny import corpus_texts

ROOT = Path(__file__).resolve().parents[1]
NUM_TEST = 6


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    corpus = root / "corpus"
    build_demo_corpus(corpus, num_train=8, num_val=2, num_test=NUM_TEST, seed=0, shard_size=4, progress=False)
    model_dir = build_tiny(root / "model", corpus_texts(corpus))
    ckpt = write_lightning_run(root / "run", model_dir)
    # a local multiple-choice manifest: two good items, one with missing audio, one whose answer is no option
    mc = root / "mc"
    mc.mkdir()
    sf.write(mc / "dog.wav", speak("a dog is barking"), 16000)
    sf.write(mc / "car.flac", speak("a car horn"), 16000)
    rows = [
        {"audio": "dog.wav", "question": "What is heard?", "choices": ["dog", "cat"], "answer": "dog", "group": "sound"},
        {"audio": "car.flac", "question": "What is heard?", "choices": ["rain", "car horn"], "answer": 1, "group": "sound"},
        {"audio": "missing.wav", "question": "?", "choices": ["a", "b"], "answer": "a"},
        {"audio": "dog.wav", "question": "?", "choices": ["cat", "bird"], "answer": "dog"},
    ]  # fmt: skip
    (mc / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, corpus, ckpt, mc / "items.jsonl"


def run_eval(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "eval.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_eval_writes_summary_table_and_predictions(eval_env, tmp_path):
    root, corpus, ckpt, mc = eval_env
    out = tmp_path / "out"
    proc = run_eval(
        f"ckpt={ckpt}",
        "benchmark=[demo,mmau_test_mini]",
        f"paths.demo_corpus_dir={corpus}",
        f"benchmark.mmau_test_mini.source={mc}",
        f"hydra.run.dir={out}",
        "generation.max_new_tokens=8",
        "batch_size=4",
        "progress=false",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    demo = summary["benchmarks"]["demo"]
    assert (
        demo["task"] == "asr" and demo["num_samples"] == NUM_TEST and demo["num_dropped_empty_reference"] == 0
    )
    assert demo["num_ref_words"] > 0 and demo["wer"] > 0.5  # an untrained model
    assert demo["substitutions"] + demo["deletions"] + demo["insertions"] == pytest.approx(
        demo["wer"] * demo["num_ref_words"]
    )
    assert demo["rtfx"] > 0 and demo["audio_s"] > 0 and summary["rtfx"] > 0
    assert set(demo["repetition"]) >= {"num_loops", "loop_rate", "min_repeats"}
    assert summary["mean_over"] == ["demo"] and summary["mean_wer"] == pytest.approx(demo["wer"])
    lines = [json.loads(x) for x in (out / "predictions" / "demo.jsonl").read_text().splitlines()]
    assert len(lines) == NUM_TEST
    assert [r["key"] for r in lines] == [f"demo-test-{i:06d}" for i in range(NUM_TEST)]  # source order
    assert set(lines[0]) >= {"key", "reference", "hypothesis", "duration_s", "num_new_tokens", "loop"}

    mmau = summary["benchmarks"]["mmau_test_mini"]
    assert mmau["task"] == "choice" and mmau["num_items"] == 2
    assert mmau["skipped"] == {"answer_not_in_choices": 1, "unreadable_audio": 1}
    assert 0.0 <= mmau["accuracy"] <= 1.0 and mmau["rtfx"] > 0
    choice_lines = (out / "predictions" / "mmau_test_mini.jsonl").read_text().splitlines()
    assert [json.loads(x)["answer"] for x in choice_lines] == [0, 1]

    table = (out / "summary.md").read_text()
    assert "| demo | 6 |" in table and "| mmau_test_mini | 2 |" in table and "**mean**" in table
    assert table.strip() in proc.stdout + proc.stderr  # the table is logged too


def test_eval_unknown_benchmark_and_missing_source_fail_clearly(eval_env, tmp_path):
    _, _, ckpt, _ = eval_env
    proc = run_eval(f"ckpt={ckpt}", "benchmark=demo", f"paths.demo_corpus_dir={tmp_path / 'nope'}",
                    f"hydra.run.dir={tmp_path / 'o1'}")  # fmt: skip
    assert proc.returncode != 0 and "does not exist" in proc.stdout + proc.stderr
    proc = run_eval(f"ckpt={ckpt}", "benchmark=no_such_benchmark", f"hydra.run.dir={tmp_path / 'o2'}")
    assert proc.returncode != 0 and "no_such_benchmark" in proc.stdout + proc.stderr


def _truncate_inside_sample(shard: Path, sample: int) -> int:
    """Cut ``shard`` in the middle of the first member of its ``sample``-th sample (0-based); return the samples
    that remain whole before the cut."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    first = next(m for m in members if m.name.split(".")[0] == keys[sample])
    shard.write_bytes(shard.read_bytes()[: first.offset_data + first.size // 2])
    return sample


def test_eval_accounts_for_every_sample_of_a_truncated_shard(eval_env, tmp_path):
    """A source whose first shard is cut inside its third sample: summary.json adds up (scored + skipped by reason =
    the samples the manifest lists), the damaged shard is reported apart, the skipped inputs are listed with their
    reasons, and the progress line (not a terminal) has the source's size as its total."""
    _, corpus, ckpt, _ = eval_env
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus / "test", damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 2]
    kept = _truncate_inside_sample(damaged / manifest["shards"][0]["name"], 2)
    out = tmp_path / "out"
    proc = run_eval(
        f"ckpt={ckpt}",
        "benchmark=demo",
        f"benchmark.demo.source={damaged}",
        f"hydra.run.dir={out}",
        "generation.max_new_tokens=4",
        "batch_size=4",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    demo = json.loads((out / "summary.json").read_text())["benchmarks"]["demo"]
    lost = 4 - kept
    assert demo["num_samples"] == NUM_TEST - lost == 4
    assert demo["skipped"] == {"missing_samples": lost}
    assert demo["damaged_shards"] == {"truncated_tar": 1}
    assert demo["accounting"] == {
        "source_samples": NUM_TEST,
        "scored": NUM_TEST - lost,
        "dropped_empty_reference": 0,
        "skipped": lost,
        "read": NUM_TEST,
        "stopped_at_max_samples": False,
        "complete": True,
    }
    listed = [json.loads(x) for x in (out / "predictions" / "demo.skipped.jsonl").read_text().splitlines()]
    shard = str(damaged / manifest["shards"][0]["name"])
    assert [(r["key"], r["reason"], r["count"]) for r in listed] == [
        (shard, "truncated_tar", 1),
        (shard, "missing_samples", lost),
    ]
    assert listed[1]["detail"] == f"read {kept} of the 4 samples the manifest lists"
    assert "| demo | 4 | 2 (missing_samples 2; truncated_tar shards 1) |" in (out / "summary.md").read_text()
    assert "demo: 6/6 (100 %)" in proc.stdout + proc.stderr
