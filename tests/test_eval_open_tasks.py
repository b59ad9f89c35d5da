"""eval.py end to end on the open tasks, with a tiny random model and local sources: captions (a JSON Lines
manifest with reference lists, and prepared shards whose <key>_c<i> samples are joined), open-ended QA, a local
classification set, spoken instructions from shards (two clips; audio as the only instruction) and AIR-Bench chat
judged by a fake OpenAI-compatible server on localhost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.aero_runs import write_lightning_run
from helpers.tiny import build_tiny

from aero_lightning.data.shards import ShardWriter, build_manifest, encode_flac, write_manifest
from aero_lightning.metrics.caption import caption_metric_status

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
TEXTS = ["a dog barks", "rain falls on a roof", "a man is speaking", "birds sing", "yes", "no", "two", "cat"]


def _wave(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)


def _jsonl(folder: Path, name: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        if row.get("audio") and not (folder / row["audio"]).exists():
            sf.write(folder / row["audio"], _wave(0.6 + 0.1 * i, i), SR)
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


AUDIO = {"type": "audio"}


def _shards(folder: Path, samples: list[tuple[str, list[np.ndarray], dict]]) -> Path:
    durations = []
    with ShardWriter(folder, "test", 10) as writer:
        for key, clips, meta in samples:
            writer.write(key, [encode_flac(c) for c in clips], meta)
            durations.append(meta["duration_s"])
    write_manifest(
        folder, build_manifest(corpus="local", split="test", shards=writer.shards, durations_s=durations)
    )
    return folder


class Judge(BaseHTTPRequestHandler):
    prompts: list[str] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = payload["messages"][0]["content"]
        Judge.prompts.append(content)
        reference_first = "[The Start of Assistant 1s Answer]\nA dog barks twice.\n" in content
        body = json.dumps(
            {"model": "fake", "choices": [{"message": {"content": "9 4" if reference_first else "5 9"}}]}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_tasks")
    ckpt = write_lightning_run(root / "run", build_tiny(root / "model", TEXTS), plain_text=True)
    data = root / "data"
    caps = _jsonl(data, "caps", [
        {"audio": "c0.wav", "references": ["a dog barks", "a dog is barking loudly"]},
        {"audio": "c1.wav", "captions": ["rain falls on a roof"]},
    ])  # fmt: skip
    aqa = _jsonl(data, "aqa", [
        {"audio": "c0.wav", "question": "Is there a dog?", "answer": "yes"},
        {"audio": "c1.wav", "question": "How many birds?", "answer": ["two", "2"]},
        {"audio": "c1.wav", "question": "?"},  # no answer: skipped as missing_text
    ])  # fmt: skip
    labels = _jsonl(data, "labels", [
        {"audio": "c0.wav", "label": "dog"},
        {"audio": "c1.wav", "label": "rain"},
    ])  # fmt: skip
    chat = _jsonl(data, "chat", [
        {"audio": "c0.wav", "question": "What animal is heard?", "answer": "A dog barks twice.",
         "context": "A dog barks twice in a quiet yard.", "group": "sound_QA"},
        {"audio": "c1.wav", "question": "What is the weather?", "answer": "A dog barks twice.",
         "context": "Rain on a roof.", "group": "sound_QA"},
    ])  # fmt: skip
    a, b = _wave(0.8, 10), _wave(0.5, 11)
    clotho = _shards(root / "clotho", [
        ("clip1_c1", [a], {"duration_s": 0.8, "task": "caption", "messages": [_user(AUDIO, {"type": "text", "text": "Describe the audio."}), _reply("a dog barks")]}),
        ("clip1_c2", [a], {"duration_s": 0.8, "task": "caption", "messages": [_user(AUDIO, {"type": "text", "text": "Describe the audio."}), _reply("a loud dog")]}),
        ("clip2_c1", [b], {"duration_s": 0.5, "task": "caption", "messages": [_user(AUDIO, {"type": "text", "text": "Describe the audio."}), _reply("birds sing")]}),
    ])  # fmt: skip
    spoken = _shards(root / "spoken", [
        ("two", [a, b], {"duration_s": 1.3, "audio_durations_s": [0.8, 0.5], "task": "instruct",
                         "messages": [_user(AUDIO, AUDIO, {"type": "text", "text": "Which clip is longer?"}), _reply("the first")]}),
        ("voice", [b], {"duration_s": 0.5, "task": "instruct", "messages": [_user(AUDIO), _reply("two")]}),
        ("chat", [], {"duration_s": 0.0, "task": "text",
                      "messages": [_user({"type": "text", "text": "2 plus 2?"}), _reply("4")]}),
    ])  # fmt: skip
    Judge.prompts = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"root": root, "ckpt": ckpt, "caps": caps, "aqa": aqa, "labels": labels, "chat": chat,
           "clotho": clotho, "spoken": spoken, "judge": f"http://127.0.0.1:{httpd.server_address[1]}/v1"}  # fmt: skip
    httpd.shutdown()
    httpd.server_close()


def test_eval_scores_every_open_task(env, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "eval.py", f"ckpt={env['ckpt']}",
            "benchmark=[audiocaps_test,clotho_test,clotho_aqa_test,air_bench_chat_sound]",
            f"benchmark.audiocaps_test.source={env['caps']}",
            f"benchmark.clotho_test.source={env['clotho']}",
            f"benchmark.clotho_aqa_test.source={env['aqa']}",
            f"benchmark.air_bench_chat_sound.source={env['chat']}",
            "+benchmark.sounds.task=classify", f"+benchmark.sounds.source={env['labels']}",
            "+benchmark.sounds.labels=[dog,rain,birds]",
            "+benchmark.spoken.task=instruct", f"+benchmark.spoken.source={env['spoken']}",
            "judge.enabled=true", f"judge.base_url={env['judge']}", "judge.model=fake-judge", "judge.api_key_env=null",
            "caption_metrics=[bleu,rouge_l,cider_d,spider,fense]",
            f"hydra.run.dir={out}", "generation.max_new_tokens=6", "batch_size=4", "progress=false",
        ],
        cwd=ROOT, env=dict(os.environ, HYDRA_FULL_ERROR="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())["benchmarks"]
    assert {k: v["task"] for k, v in summary.items()} == {
        "audiocaps_test": "caption", "clotho_test": "caption", "clotho_aqa_test": "aqa",
        "air_bench_chat_sound": "aqa", "sounds": "classify", "spoken": "instruct",
    }  # fmt: skip

    caps = summary["audiocaps_test"]
    assert caps["num_items"] == 2 and caps["accounting"]["complete"]
    if caption_metric_status(["cider_d"])["cider_d"] is None:
        assert {"bleu_4", "rouge_l", "cider_d"} <= set(caps) and caps["headline"]["metric"] == "cider_d"
    assert set(caps["caption_unavailable"]) >= {"fense"}
    lines = [json.loads(x) for x in (out / "predictions" / "audiocaps_test.jsonl").read_text().splitlines()]
    assert lines[0]["references"] == ["a dog barks", "a dog is barking loudly"] and "f1" in lines[0]

    # prepared caption shards: clip1_c1 + clip1_c2 are one item with both references; 3 samples accounted for
    clotho = summary["clotho_test"]
    assert clotho["num_items"] == 2
    assert clotho["accounting"]["source_samples"] == 3
    assert clotho["accounting"]["scored"] == 3 and clotho["accounting"]["complete"] is True
    rows = [json.loads(x) for x in (out / "predictions" / "clotho_test.jsonl").read_text().splitlines()]
    assert [(r["key"], r["references"]) for r in rows] == [
        ("clip1", ["a dog barks", "a loud dog"]), ("clip2", ["birds sing"])
    ]  # fmt: skip

    aqa = summary["clotho_aqa_test"]
    assert aqa["num_items"] == 2 and aqa["skipped"] == {"missing_text": 1} and aqa["accounting"]["complete"]
    assert 0.0 <= aqa["exact_match"] <= aqa["f1"] <= 1.0 and "judge" not in aqa  # not a judged benchmark

    sounds = summary["sounds"]
    assert (
        sounds["num_labels"] == 3 and sounds["num_items"] == 2 and sounds["headline"]["metric"] == "accuracy"
    )
    assert sounds["num_correct"] + sounds["num_unparsed"] <= 2

    spoken = summary["spoken"]  # decoded with each sample's own messages: two clips, and audio alone
    assert spoken["num_items"] == 2 and spoken["accounting"]["complete"]
    assert spoken["skipped"] == {"empty_audio": 1}  # the text-only chat sample: no audio to decode
    rows = [json.loads(x) for x in (out / "predictions" / "spoken.jsonl").read_text().splitlines()]
    assert [(r["key"], r["question"], r["task"]) for r in rows] == [
        ("two", "Which clip is longer?", "instruct"), ("voice", "", "instruct")
    ]  # fmt: skip
    assert rows[0]["duration_s"] == pytest.approx(1.3)

    # the fake judge: reference first "9 4" -> the reply 4; reply first "5 9" -> 5: each item (4 + 5) / 2 = 4.5
    judged = summary["air_bench_chat_sound"]["judge"]
    assert judged["num_judged"] == 2 and judged["score"] == pytest.approx(4.5) and judged["failures"] == {}
    assert judged["reference_score"] == pytest.approx(9.0)
    assert summary["air_bench_chat_sound"]["headline"] == {"metric": "judge_score", "value": 4.5}
    assert len(Judge.prompts) == 4
    assert any(
        "[Detailed Audio Description]\nA dog barks twice in a quiet yard.\n" in p for p in Judge.prompts
    )

    table = (out / "summary.md").read_text()
    assert "| air_bench_chat_sound | aqa | 2 |" in table and "4.50 (2/2)" in table
    assert "| sounds | classify | 2 |" in table and "fense unavailable:" in table
    assert table.strip() in proc.stdout + proc.stderr


def test_judge_enabled_without_its_key_fails_before_decoding(env, tmp_path):
    proc = subprocess.run(
        [sys.executable, "eval.py", f"ckpt={env['ckpt']}", "benchmark=air_bench_chat_sound",
         f"benchmark.air_bench_chat_sound.source={env['chat']}", "judge.enabled=true",
         "judge.api_key_env=AERO_NO_SUCH_KEY", f"hydra.run.dir={tmp_path / 'o'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "AERO_NO_SUCH_KEY"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error: judge.enabled=true but the environment variable AERO_NO_SUCH_KEY" in proc.stderr
