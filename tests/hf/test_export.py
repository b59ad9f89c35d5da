"""Export round trip for each encoder type (Whisper, HuBERT, wav2vec 2.0): the transformers pipeline, loaded with
trust_remote_code in a process that cannot import aero_lightning, gives transcribe.py's text for the same audio and
model; generation arguments pass through (checked on the Whisper model: they do not depend on the encoder)."""

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
from helpers.ssl_tiny import build_tiny_ssl

from aero_lightning.eval.decode import GenerationOptions
from aero_lightning.hf.export import export, remote_code_files
from aero_lightning.model.build import load_model
from aero_lightning.tasks.transcribe import transcribe_files

ROOT = Path(__file__).resolve().parents[2]
ENCODERS = ("whisper", "hubert", "wav2vec2")
SSL_ENCODER_CONFIGS = {"hubert": "hubert_large", "wav2vec2": "wav2vec2_large"}
ALL_MODES = ("greedy", "one_token", "beam", "guarded", "chunked")
# the decoding options do not depend on the encoder: the SSL models run the text checks that do (whole files of one
# and two windows, and chunks)
MODES = {"whisper": ALL_MODES, "hubert": ("greedy", "chunked"), "wav2vec2": ("greedy", "chunked")}

# Runs in a child process: drops the repository and aero_lightning's editable-install finder from the import
# system, proves aero_lightning cannot be imported, runs each export's pipeline in the modes asked for, and reports
# which modules it loaded.
CHILD = r"""
import importlib.util, json, sys
repo, jobs, files = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if not (p.rstrip("/") == repo or (p.startswith(repo + "/") and "/.venv/" not in p))]
assert importlib.util.find_spec("aero_lightning") is None, "aero_lightning is still importable"
from transformers import pipeline
results = {}
for kind, (folder, modes) in jobs.items():
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    calls = {}  # per mode, what reached the model's generate: (max_new_tokens, num_beams, new tokens returned)
    generate = asr.model.generate
    def spy(*args, **kwargs):
        tokens = generate(*args, **kwargs)
        calls[mode].append((kwargs.get("max_new_tokens"), kwargs.get("num_beams", 1), tokens.shape[1]))
        return tokens
    asr.model.generate = spy
    runs = {
        "greedy": lambda f: asr(f, repetition_guard=False)["text"],
        "one_token": lambda f: asr(f, max_new_tokens=1)["text"],
        "beam": lambda f: asr(f, num_beams=3, max_new_tokens=6)["text"],
        "guarded": lambda f: asr(f),
        "chunked": lambda f: asr(f, chunk_length_s=20, stride_length_s=2),
    }
    out = {}
    for mode in modes:
        calls[mode] = []
        out[mode] = [runs[mode](f) for f in files]
    results[kind] = out | {
        "calls": calls,
        "model_class": type(asr.model).__module__ + "." + type(asr.model).__name__,
    }
results["aero_modules"] = sorted(m for m in sys.modules if m.startswith("aero_lightning"))
print("RESULT " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> list[Path]:
    """A 16 kHz WAV, an 8 kHz stereo FLAC and a 40 s (two-window) OGG of espeak-ng speech."""
    audio = tmp_path_factory.mktemp("audio")
    sf.write(audio / "a.wav", speak(SENTENCES[0]), 16000)
    wave_8k = soxr.resample(speak(SENTENCES[1], 1), 16000, 8000)
    sf.write(audio / "b_8k_stereo.flac", np.stack([wave_8k, wave_8k], axis=1), 8000)
    long = np.concatenate([speak(s, i) for i, s in enumerate(SENTENCES)] * 3)[: 40 * 16000]  # two windows
    sf.write(audio / "c_40s.ogg", long, 16000, format="OGG", subtype="VORBIS")
    return [audio / "a.wav", audio / "b_8k_stereo.flac", audio / "c_40s.ogg"]


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``{encoder type: (checkpoint, export folder)}``: a demo run with a random tiny encoder of each type (the
    demo's tiny LLM and projector), exported."""
    root = tmp_path_factory.mktemp("export")
    made = {}
    for kind in ENCODERS:
        overrides = ()
        if kind != "whisper":
            ssl = build_tiny_ssl(root / kind, kind)
            overrides = (
                f"model/encoder={SSL_ENCODER_CONFIGS[kind]}",
                f"model.encoder.name_or_path={ssl}",
                "model.encoder.expect=null",
            )
        ckpt = write_lightning_run(
            root / f"run_{kind}", tiny_dir, seed=3, plain_text=True, overrides=overrides
        )
        # verify=True: the reloaded folder's logits equal the checkpoint's
        made[kind] = ckpt, export(ckpt, root / f"hf_{kind}")
    return made


@pytest.fixture(params=ENCODERS)
def exported(request, exports, audio_files):
    """``(encoder type, checkpoint, export folder, audio files)`` for each encoder type."""
    return request.param, *exports[request.param], audio_files


@pytest.fixture(scope="module")
def isolated(exports, audio_files, tmp_path_factory) -> dict:
    """Every export's pipeline outputs (:data:`MODES`), from one process that cannot import aero_lightning:
    ``{encoder type: {mode: outputs, "calls", "model_class"}, "aero_modules": [...]}``."""
    tmp_path = tmp_path_factory.mktemp("isolated")
    jobs = {kind: [str(out), list(MODES[kind])] for kind, (_, out) in exports.items()}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(ROOT), json.dumps(jobs), *map(str, audio_files)],
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
    kind, ckpt, out, _ = exported
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
    # the token count, the waveform normalisation and the encoder adapters travel with the folder
    assert {"audio_tokens.py", "ssl_encoders.py", "encoders.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["encoder_config"]["model_type"] == kind
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["feature_type"] == ("log_mel" if kind == "whisper" else "waveform")
    assert preprocessor["do_normalize"] is True  # conf/model/encoder/*_large.yaml: normalize: true
    assert preprocessor["projector_downsample"] == 4  # the demo's mlp_stack stack_factor
    readme = (out / "README.md").read_text()
    assert {"whisper": "Whisper-architecture", "hubert": "HuBERT", "wav2vec2": "wav2vec 2.0"}[kind] in readme
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
        export(ckpt, out)


def test_pipeline_text_equals_transcribe_text(exported, isolated):
    kind, ckpt, out, files = exported
    modes = MODES[kind]
    child = isolated[kind]
    assert isolated["aero_modules"] == []  # the exports ran on transformers alone
    assert child["model_class"].endswith("modeling_aero.AeroForConditionalGeneration")

    model = load_model(ckpt, device="cpu")

    def texts(options: GenerationOptions) -> list[str]:
        result = transcribe_files(model, files, options=options, batch_size=1, progress=False)
        return [r["text"] for r in result["records"]]

    def outputs(options: GenerationOptions) -> list[dict]:
        result = transcribe_files(model, files, options=options, batch_size=1, progress=False)
        return [
            {"text": r["text"], "stopped_by_repetition_guard": r["stopped_by_repetition_guard"]}
            for r in result["records"]
        ]

    # the same duration-scaled budget on both sides, without the repetition guard (it ends these random replies
    # in the same one-token loop, compared below)
    assert child["greedy"] == texts(GenerationOptions(repetition_guard=None))
    assert all(c[0] > 1 and c[1] == 1 for c in child["calls"]["greedy"])  # the duration-scaled default budget
    assert all(child["greedy"]) and len(set(child["greedy"])) == 3  # not vacuous: three different texts
    # chunk_length_s / stride_length_s: transcribe.py's chunks (the 40 s file in three, the others whole)
    assert child["chunked"] == outputs(GenerationOptions(chunk_s=20, stride_s=2))
    assert len(child["calls"]["chunked"]) == 1 + 1 + 3  # one generate call per chunk
    if "one_token" in modes:
        assert child["one_token"] == texts(GenerationOptions(max_new_tokens=1))
        one = child["calls"]["one_token"]
        assert [c[:2] for c in one] == [[1, 1]] * 3 and all(c[2] <= 1 for c in one)  # at most one new token
    if "beam" in modes:
        assert child["beam"] == texts(GenerationOptions(num_beams=3, max_new_tokens=6))
        beam = child["calls"]["beam"]
        assert [c[:2] for c in beam] == [[6, 3]] * 3 and all(c[2] <= 6 for c in beam)
    if "guarded" in modes:
        # the repetition guard: the same stops and texts, flagged on both sides
        assert child["guarded"] == outputs(GenerationOptions())
        assert [g["stopped_by_repetition_guard"] for g in child["guarded"]] == [True] * 3


def test_exported_model_matches_the_checkpoint_in_process(exported):
    """Logits of the folder loaded with AutoModel equal AeroModel's on a two-window clip (export verifies a
    3 s clip; this covers the 30 s window split)."""
    from transformers import AutoFeatureExtractor, AutoModel

    from aero_lightning.data.chat import encode_chat
    from aero_lightning.eval.decode import user_messages

    kind, ckpt, out, files = exported
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
