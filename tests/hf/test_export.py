"""Export round trip: the transformers pipeline, loaded with trust_remote_code in a process that cannot import
aero_lightning, gives transcribe.py's text for the same audio and model; generation arguments pass through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from helpers.aero_runs import SENTENCES, speak, write_lightning_run

from aero_lightning.eval.decode import GenerationOptions
from aero_lightning.hf.export import export, remote_code_files
from aero_lightning.model.build import load_model
from aero_lightning.tasks.transcribe import transcribe_files

ROOT = Path(__file__).resolve().parents[2]

# Runs in a child process: drops the repository and aero_lightning's editable-install finder from the import
# system, proves aero_lightning cannot be imported, runs the pipeline, and reports which modules it loaded.
CHILD = r"""
import importlib.util, json, sys
repo = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if not (p.rstrip("/") == repo or (p.startswith(repo + "/") and "/.venv/" not in p))]
assert importlib.util.find_spec("aero_lightning") is None, "aero_lightning is still importable"
from transformers import pipeline
asr = pipeline("automatic-speech-recognition", model=sys.argv[2], trust_remote_code=True)
files = sys.argv[3:]
calls = []  # what reached the model's generate: (max_new_tokens, num_beams, new tokens returned)
generate = asr.model.generate
def spy(*args, **kwargs):
    tokens = generate(*args, **kwargs)
    calls.append((kwargs.get("max_new_tokens"), kwargs.get("num_beams", 1), tokens.shape[1]))
    return tokens
asr.model.generate = spy
out = {
    "greedy": [asr(f, repetition_guard=False)["text"] for f in files],
    "one_token": [asr(f, max_new_tokens=1)["text"] for f in files],
    "beam": [asr(f, num_beams=3, max_new_tokens=6)["text"] for f in files],
    "guarded": [asr(f) for f in files],
    "chunked": [asr(f, chunk_length_s=20, stride_length_s=2) for f in files],
    "calls": calls,
    "aero_modules": sorted(m for m in sys.modules if m.startswith("aero_lightning")),
    "model_class": type(asr.model).__module__ + "." + type(asr.model).__name__,
}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = write_lightning_run(root / "run", tiny_dir, seed=3, plain_text=True)
    audio = root / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", speak(SENTENCES[0]), 16000)
    wave_8k = soxr.resample(speak(SENTENCES[1], 1), 16000, 8000)
    sf.write(audio / "b_8k_stereo.flac", np.stack([wave_8k, wave_8k], axis=1), 8000)
    long = np.concatenate([speak(s, i) for i, s in enumerate(SENTENCES)] * 3)[: 40 * 16000]  # two windows
    sf.write(audio / "c_40s.ogg", long, 16000, format="OGG", subtype="VORBIS")
    out = export(ckpt, root / "hf")  # verify=True: the reloaded folder's logits equal the checkpoint's
    files = [audio / "a.wav", audio / "b_8k_stereo.flac", audio / "c_40s.ogg"]
    return ckpt, out, files


def _pipeline_in_isolation(out: Path, files, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(ROOT), str(out), *map(str, files)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_export_folder_contents(exported):
    _, out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "README.md",
    } <= names
    assert {
        "modeling_aero.py",
        "configuration_aero.py",
        "feature_extraction_aero.py",
        "processing_aero.py",
        "pipeline_aero.py",
        "processor_config.json",
        "repetition_guard.py",
        "chunking.py",
    } <= names
    for name, source in remote_code_files().items():
        assert name in names
        assert "from aero_lightning" not in source and "import aero_lightning" not in source
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_aero.AeroForConditionalGeneration"
    assert config["auto_map"]["AutoProcessor"] == "processing_aero.AeroProcessor"
    assert config["repetition_guard"] == {"max_ngram": 32, "min_repeats": 4, "min_tokens": 40}
    assert (config["max_pass_s"], config["chunk_s"], config["stride_s"]) == (900.0, None, 5.0)
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_aero.AeroProcessor"}
    assert (
        config["custom_pipelines"]["automatic-speech-recognition"]["impl"] == "pipeline_aero.AeroASRPipeline"
    )
    with pytest.raises(FileExistsError):
        export(exported[0], out)


def test_pipeline_text_equals_transcribe_text(exported, tmp_path):
    ckpt, out, files = exported
    child = _pipeline_in_isolation(out, files, tmp_path)
    assert child["aero_modules"] == []  # the export ran on transformers alone
    assert child["model_class"].endswith("modeling_aero.AeroForConditionalGeneration")

    model = load_model(ckpt, device="cpu")

    def texts(options: GenerationOptions) -> list[str]:
        result = transcribe_files(model, files, options=options, batch_size=1, progress=False)
        return [r["text"] for r in result["records"]]

    # the same duration-scaled budget on both sides, without the repetition guard (it ends these random replies
    # in the same one-token loop, compared below)
    assert child["greedy"] == texts(GenerationOptions(repetition_guard=None))
    assert child["one_token"] == texts(GenerationOptions(max_new_tokens=1))
    assert child["beam"] == texts(GenerationOptions(num_beams=3, max_new_tokens=6))

    def outputs(options: GenerationOptions) -> list[dict]:
        result = transcribe_files(model, files, options=options, batch_size=1, progress=False)
        return [
            {"text": r["text"], "stopped_by_repetition_guard": r["stopped_by_repetition_guard"]}
            for r in result["records"]
        ]

    # the repetition guard: the same stops and texts, flagged on both sides
    assert child["guarded"] == outputs(GenerationOptions())
    assert [g["stopped_by_repetition_guard"] for g in child["guarded"]] == [True] * 3
    # chunk_length_s / stride_length_s: transcribe.py's chunks (the 40 s file in three, the others whole)
    assert child["chunked"] == outputs(GenerationOptions(chunk_s=20, stride_s=2))
    chunk_calls = child["calls"][12:]
    assert len(chunk_calls) == 1 + 1 + 3  # one generate call per chunk
    greedy, one, beam = child["calls"][:3], child["calls"][3:6], child["calls"][6:9]
    assert all(c[0] > 1 and c[1] == 1 for c in greedy)  # the duration-scaled default budget
    assert [c[:2] for c in one] == [[1, 1]] * 3 and all(c[2] <= 1 for c in one)  # at most one new token
    assert [c[:2] for c in beam] == [[6, 3]] * 3 and all(c[2] <= 6 for c in beam)
    assert all(child["greedy"]) and len(set(child["greedy"])) == 3  # not vacuous: three different texts


def test_exported_model_matches_the_checkpoint_in_process(exported):
    """Logits of the folder loaded with AutoModel equal AeroModel's on a two-window clip (export verifies a
    3 s clip; this covers the 30 s window split)."""
    from transformers import AutoFeatureExtractor, AutoModel

    from aero_lightning.data.chat import encode_chat
    from aero_lightning.eval.decode import user_messages

    ckpt, out, files = exported
    model = load_model(ckpt, device="cpu")
    hf = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    fe = AutoFeatureExtractor.from_pretrained(str(out), trust_remote_code=True)
    wave = sf.read(files[2], dtype="float32")[0]
    feats = fe(wave, sampling_rate=16000)
    assert feats["windows_per_clip"].tolist() == [2]
    n_audio = int(feats["num_audio_tokens"][0])
    assert n_audio == model.audio_token_counter()(len(wave))
    ids = torch.tensor(
        [encode_chat(model.tokenizer, user_messages(), [n_audio], add_generation_prompt=True).input_ids]
    )
    with torch.no_grad():
        batch_feats, batch_lengths = model.compute_features(
            torch.from_numpy(np.stack([wave[:480000], np.pad(wave[480000:], (0, 960000 - len(wave)))])),
            torch.tensor([480000, len(wave) - 480000]),
        )
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=batch_feats,
                    feature_lengths=batch_lengths).logits  # fmt: skip
        got = hf(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats["input_features"],
                 feature_lengths=feats["feature_lengths"]).logits  # fmt: skip
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
