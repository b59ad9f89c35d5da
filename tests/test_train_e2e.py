"""End to end through `python train.py experiment=demo` on a tiny generated corpus and tiny model folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny import build_tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from aero_lightning.data.synth import build_demo_corpus
from aero_lightning.model.encoders import WhisperAudioEncoder
from aero_lightning.model.tiny import corpus_texts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus"
    build_demo_corpus(corpus, num_train=24, num_val=4, num_test=4, seed=0, shard_size=8, progress=False)
    model = root / "model"
    build_tiny(model, corpus_texts(corpus))
    return root, corpus, model


def run_train(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def base_overrides(corpus: Path, model: Path, out: Path) -> list[str]:
    return [
        "experiment=demo",
        f"paths.demo_corpus_dir={corpus}",
        f"paths.demo_model_dir={model}",
        f"hydra.run.dir={out}",
        "data.num_workers=0",
        "data.packing.packing_length=400",
        "data.packing.buffer_size=16",
        "data.eval_batch_size=4",
        "trainer.enable_progress_bar=false",
    ]


def test_demo_fast_dev_run(demo_env):
    root, corpus, model = demo_env
    out = root / "fast_dev_run"
    proc = run_train(*base_overrides(corpus, model, out), "trainer.fast_dev_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    test = result["test"]
    # fast_dev_run decodes one batch of the 4 test sentences; an untrained model gets them wrong
    assert test["num_samples"] == 4
    assert test["num_ref_words"] > 0
    assert test["wer"] > 0.5
    lines = (out / "predictions_test.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert set(json.loads(lines[0])) >= {"key", "reference", "hypothesis", "duration_s"}


def test_checkpoint_resume_continues_step_count(demo_env):
    root, corpus, model = demo_env
    out = root / "resume"
    common = [
        *base_overrides(corpus, model, out),
        "run_test=false",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    first = run_train(*common, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = out / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    before = {k: v.clone() for k, v in state["state_dict"].items()}

    second = run_train(*common, "trainer.max_steps=4", f"ckpt_path={ckpt}")
    assert second.returncode == 0, second.stderr[-3000:]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    # the optimizer and LR scheduler states came back too (scheduler counted 4 steps, not 2)
    assert state["lr_schedulers"][0]["last_epoch"] == 4
    changed = [k for k, v in state["state_dict"].items() if not torch.equal(v, before[k])]
    assert changed, "resumed training did not update any parameter"
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


def test_final_step_is_checkpointed_off_the_save_schedule(demo_env):
    # 3 steps, saves every 2: Lightning's ModelCheckpoint alone leaves last.ckpt at step 2
    root, corpus, model = demo_env
    out = root / "final_step"
    result = run_train(
        *base_overrides(corpus, model, out),
        "run_test=false",
        "trainer.limit_val_batches=0",
        "trainer.max_steps=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == [
        "last.ckpt",
        "step0000002.ckpt",
        "step0000003.ckpt",
    ]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    final = torch.load(ckpts / "step0000003.ckpt", map_location="cpu", weights_only=False)
    earlier = torch.load(ckpts / "step0000002.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == final["global_step"] == 3
    assert all(torch.equal(v, final["state_dict"][k]) for k, v in last["state_dict"].items())
    assert any(not torch.equal(v, earlier["state_dict"][k]) for k, v in last["state_dict"].items())
    assert json.loads((out / "result.json").read_text())["last_checkpoint"] == str(ckpts / "last.ckpt")


def test_three_stage_demo_ctc_then_demo_long_stage2_then_stage3(demo_env):
    """Stage 1 trains the encoder alone (LLM untouched); stage 2 starts from that encoder and keeps it and the
    projector frozen; stage 3 starts from all of stage 2's weights and trains every one of them."""
    root, corpus, model = demo_env
    stage1, stage2, stage3 = root / "stage1", root / "stage2", root / "stage3"

    def overrides(experiment: str, out: Path) -> list[str]:
        common = [o for o in base_overrides(corpus, model, out) if not o.startswith("experiment=")]
        return [f"experiment={experiment}", *common, "trainer.max_steps=2", "trainer.limit_val_batches=1"]

    first = run_train(*overrides("demo_ctc", stage1), "callbacks.model_checkpoint.every_n_train_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(
        *overrides("demo_long_stage2", stage2),
        f"model.init_from.ckpt={stage1}",
        "run_test=false",
        "model.ctc_weight=0",
    )
    assert second.returncode == 0, second.stderr[-3000:]

    one = torch.load(stage1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    two = torch.load(stage2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    llm0 = AutoModelForCausalLM.from_pretrained(model / "llm").state_dict()
    encoder = [k for k in one if k.startswith("model.encoder.")]
    assert encoder and all(torch.equal(one[k], two[k]) for k in encoder)  # copied, then frozen
    # stage 1 never ran the LLM; stage 2 trained it
    assert all(torch.equal(one[f"model.llm.{k}"], v) for k, v in llm0.items() if f"model.llm.{k}" in one)
    assert any(not torch.equal(two[f"model.llm.{k}"], v) for k, v in llm0.items() if f"model.llm.{k}" in two)
    enc0 = WhisperAudioEncoder.from_pretrained(str(model / "encoder")).state_dict()
    assert any(not torch.equal(one[f"model.encoder.{k}"], v) for k, v in enc0.items())  # stage 1 trained it

    third = run_train(
        *overrides("demo_long_stage3", stage3), f"model.init_from.ckpt={stage2}", "run_test=false"
    )
    assert third.returncode == 0, third.stderr[-3000:]
    three = torch.load(stage3 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    log = (stage3 / "train.log").read_text()
    assert f"init_from {stage2 / 'checkpoints' / 'last.ckpt'}: copied {len(two)} tensors" in log
    for part in ("model.encoder.", "model.projector.", "model.llm."):
        names = [k for k in two if k.startswith(part) and three[k].is_floating_point()]
        assert any(not torch.equal(two[k], three[k]) for k in names), f"stage 3 did not train {part}"


def test_demo_ctc_then_demo_staged_unfreezes_at_its_step_and_after_resume(demo_env):
    """experiment=demo_staged from a demo_ctc run: stage 1's encoder and CTC head are copied and frozen with the
    projector until module.unfreeze.at_step, then trained at lr_scale (0.5 here) times the schedule's LR; a run
    resumed after the switch keeps training them."""
    root, corpus, model = demo_env
    stage1, out = root / "staged_stage1", root / "staged"

    def overrides(experiment: str, run: Path) -> list[str]:
        common = [o for o in base_overrides(corpus, model, run) if not o.startswith("experiment=")]
        return [f"experiment={experiment}", *common, "trainer.limit_val_batches=1", "run_test=false"]

    first = run_train(*overrides("demo_ctc", stage1), "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    staged = [
        *overrides("demo_staged", out),
        f"model.init_from.ckpt={stage1}",
        "module.unfreeze.at_step=2",
        "module.unfreeze.lr_scale=0.5",
        "trainer.val_check_interval=100",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    second = run_train(*staged, "trainer.max_steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "more trainable from step 2" in log and "step 2: unfroze" in log

    def load(name: str) -> dict:
        return torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=False)

    one = torch.load(stage1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    s1, s2, s3 = (load(f"step000000{i}.ckpt") for i in (1, 2, 3))
    copied = [k for k in one if k.startswith(("model.encoder.", "model.ctc_head."))]
    assert copied and all(torch.equal(s2["state_dict"][k], one[k]) for k in copied)  # copied, then frozen
    for part in ("model.encoder.encoder.layers.", "model.projector.", "model.ctc_head.", "model.llm."):
        names = [k for k in s3["state_dict"] if k.startswith(part)]
        assert names and any(not torch.equal(s2["state_dict"][k], s3["state_dict"][k]) for k in names), part
    table = "model.encoder.encoder.embed_positions.weight"  # Whisper's sinusoids stay fixed
    assert torch.equal(s3["state_dict"][table], one[table])
    # groups: LLM (decay, no decay), then encoder + projector + CTC head at 0 until step 2, then 0.5 x the LR
    lrs1, lrs3 = s1["lr_schedulers"][0]["_last_lr"], s3["lr_schedulers"][0]["_last_lr"]
    assert lrs1[2:] == [0.0, 0.0] and lrs1[0] > 0
    ramp = 2 / 50  # the LR for step 3, the second of module.unfreeze.warmup_steps
    assert lrs3[2] == pytest.approx(0.5 * ramp * lrs3[0]) and lrs3[3] == pytest.approx(0.5 * ramp * lrs3[1])

    third = run_train(*staged, "trainer.max_steps=4", f"ckpt_path={out / 'checkpoints' / 'step0000003.ckpt'}")
    assert third.returncode == 0, third.stderr[-3000:]
    s4 = load("step0000004.ckpt")
    assert s4["global_step"] == 4
    encoder = [k for k in s4["state_dict"] if k.startswith("model.encoder.encoder.layers.")]
    assert any(not torch.equal(s3["state_dict"][k], s4["state_dict"][k]) for k in encoder)
    assert s4["lr_schedulers"][0]["_last_lr"][2] == pytest.approx(
        0.5 * 3 / 50 * s4["lr_schedulers"][0]["_last_lr"][0]
    )


def _val_losses(run: Path, tag: str = "val/demo_espeak/loss") -> dict[int, float]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_make_demo_recipe_val_loss_falls_in_every_stage_and_weights_carry_over(demo_env):
    """The recipe `make demo` runs, shortened: demo_ctc (stage 1), then demo_staged (the LLM on the frozen encoder
    until module.unfreeze.at_step, then every weight). The validation loss falls within each stage; stage 2 starts
    from stage 1's encoder and CTC head, and the unfreeze switch continues from the weights the frozen phase left
    (no re-initialisation, no reload); the run prints test transcripts beside their references."""
    root, corpus, model = demo_env
    stage1, staged = root / "recipe_stage1", root / "recipe_staged"

    def overrides(experiment: str, run: Path) -> list[str]:
        common = [o for o in base_overrides(corpus, model, run) if not o.startswith("experiment=")]
        return [
            f"experiment={experiment}",
            *common,
            "trainer.val_check_interval=10",
            "trainer.limit_val_batches=1",
        ]

    first = run_train(*overrides("demo_ctc", stage1), "trainer.max_steps=30")
    assert first.returncode == 0, first.stderr[-3000:]
    ctc = _val_losses(stage1)
    assert sorted(ctc) == [9, 19, 29] and ctc[29] < ctc[19] < ctc[9], ctc

    second = run_train(
        *overrides("demo_staged", staged),
        f"model.init_from.ckpt={stage1}",
        "trainer.max_steps=40",
        "module.unfreeze.at_step=20",
        "module.unfreeze.warmup_steps=5",
        "module.warmup_steps=10",
        "callbacks.model_checkpoint.every_n_train_steps=10",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    lm = _val_losses(staged)
    assert sorted(lm) == [9, 19, 29, 39]
    assert lm[19] < lm[9], f"stage 2 (frozen encoder): {lm}"
    assert lm[39] < lm[19], f"stage 3 (every weight): {lm}"

    def weights(run: Path, name: str) -> dict:
        return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)["state_dict"]

    one = weights(stage1, "last.ckpt")
    at10, at20, at30 = (weights(staged, f"step00000{n}.ckpt") for n in (10, 20, 30))
    carried = [k for k in one if k.startswith(("model.encoder.encoder.layers.", "model.ctc_head."))]
    assert carried and all(
        torch.equal(at20[k], one[k]) for k in carried
    )  # copied from stage 1, frozen to step 20
    assert any(not torch.equal(at30[k], one[k]) for k in carried)  # trained after the switch
    llm = [k for k in at20 if k.startswith("model.llm.")]
    # the LLM goes on from where the frozen phase left it: it moves less over the 10 steps after the switch than
    # its distance from the 10th step, so it was neither re-initialised nor reloaded at the switch
    moved = sum(float((at30[k] - at20[k]).norm()) for k in llm)
    back = sum(float((at30[k] - at10[k]).norm()) for k in llm)
    assert 0 < moved < back
    assert (
        "test utterances, greedy transcript (HYP) beside the reference (REF)" in second.stdout + second.stderr
    )
    predictions = [json.loads(line) for line in (staged / "predictions_test.jsonl").read_text().splitlines()]
    first_ref = sorted(predictions, key=lambda r: r["key"])[0]["reference"]
    assert f"REF  {first_ref}" in (staged / "train.log").read_text()


def test_missing_data_folder_fails_before_training(demo_env, tmp_path):
    root, _, model = demo_env
    missing = tmp_path / "no_such_corpus"
    proc = run_train(*base_overrides(missing, model, tmp_path / "out"), "trainer.max_steps=1")
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "does not exist" in err and "aero_lightning.data.synth" in err
    assert "Loading weights" not in err  # failed before the model was loaded


def test_empty_data_folder_fails_before_training(demo_env, tmp_path):
    root, corpus, model = demo_env
    empty = tmp_path / "empty_corpus"
    for split in ("train", "validation", "test"):
        (empty / split).mkdir(parents=True)
    proc = run_train(*base_overrides(empty, model, tmp_path / "out"), "trainer.max_steps=1")
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "manifest.json" in err and "aero_lightning.data.synth" in err
    assert "Loading weights" not in err


def _bad_corpus(folder: Path) -> Path:
    """One shard holding two good samples and one of each kind of bad input."""
    import io
    import tarfile

    import numpy as np
    import soundfile as sf

    from aero_lightning.data.shards import asr_sample_json, build_manifest, write_manifest

    def flac(seconds, sr=16000, channels=1):
        wave = 0.1 * np.random.default_rng(0).standard_normal((round(seconds * sr), channels)).astype(
            np.float32
        )
        buf = io.BytesIO()
        sf.write(buf, wave, sr, format="FLAC")
        return buf.getvalue()

    def rec(seconds, text="a good sentence"):
        return json.dumps(
            asr_sample_json(corpus="broken", text=text, duration_s=seconds, source="t")
        ).encode()

    members = [
        ("good1.flac", flac(1.0)), ("good1.json", rec(1.0)),
        ("corrupt.flac", b"fLaC" + bytes(64)), ("corrupt.json", rec(1.0)),
        ("rate.flac", flac(1.0, sr=8000)), ("rate.json", rec(1.0)),
        ("stereo.flac", flac(1.0, channels=2)), ("stereo.json", rec(1.0)),
        ("notext.flac", flac(1.0)), ("notext.json", rec(1.0, text=" ")),
        ("badjson.flac", flac(1.0)), ("badjson.json", b"{oops"),
        ("long.flac", flac(40.0)), ("long.json", rec(40.0)),
        ("good2.flac", flac(1.5)), ("good2.json", rec(1.5)),
    ]  # fmt: skip
    folder.mkdir(parents=True)
    with tarfile.open(folder / "broken-000000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards = [{"name": "broken-000000.tar", "num_samples": 8, "duration_s": 46.5}]
    write_manifest(
        folder, build_manifest(corpus="broken", split="train", shards=shards, durations_s=[5.8] * 8)
    )
    return folder


def test_bad_training_samples_are_skipped_counted_and_logged(demo_env, tmp_path):
    """A mixture with a corpus full of bad input trains to the end; every reason is counted and logged."""
    root, corpus, model = demo_env
    broken = _bad_corpus(tmp_path / "broken")
    out = tmp_path / "out"
    proc = run_train(
        *base_overrides(corpus, model, out),
        f"+data.train.broken={{dir:{broken},weight:1.0}}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "trainer.limit_val_batches=1",
        "callbacks.throughput.window=2",
        "trainer.log_every_n_steps=2",
        "run_test=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rejected = json.loads((out / "result.json").read_text())["data_rejected"]
    assert set(rejected) == {
        "corrupt_audio",
        "sample_rate",
        "not_mono",
        "empty_text",
        "bad_json",
        "over_budget",
    }
    assert all(n >= 1 for n in rejected.values())
    log = (out / "train.log").read_text()
    assert "skipping broken-000000.tar:corrupt: corrupt_audio LibsndfileError: " in log  # shard and key named
    assert "training samples skipped" in log and " at 0x" not in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "data/rejected/bad_json" in events.Tags()["scalars"]


def test_ddp_validation_when_a_rank_gets_no_shard_of_a_set(demo_env):
    """4 validation sentences in one shard, 2 ranks: rank 1 has no batch of the set but joins the gather."""
    root, corpus, model = demo_env
    out = root / "ddp_val"
    proc = run_train(
        *base_overrides(corpus, model, out),
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "run_test=false",
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    (val,) = events.Scalars("val/demo_espeak/loss")
    assert val.step == 1 and val.value > 0  # the token-weighted mean of rank 0's batches
