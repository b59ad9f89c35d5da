"""Cached encoder outputs: the cache build, its fingerprint, training on it (exact in fp32), and its refusals."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from aero_lightning.data.cache_encoder import cache_split, main
from aero_lightning.data.chat import asr_messages
from aero_lightning.data.datamodule import AeroDataModule
from aero_lightning.data.encoder_cache import (
    EncoderCacheReader,
    cache_dir,
    check_encoder_frozen,
    model_encoder_fingerprint,
    resolve_cache,
)
from aero_lightning.data.packing import to_pcm16
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import iter_tar, parse_sample
from aero_lightning.data.shards import ShardWriter, build_manifest, encode_flac, write_manifest
from aero_lightning.data.stream import TrainStream
from aero_lightning.errors import UserFileNotFoundError, UserValueError
from aero_lightning.lit_module import AeroLitModule

SR = 16000
FROZEN = [r"^encoder\."]


def _wave(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)


def _two_clip_messages() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "first clip"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "and this one"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ]


def _text_messages() -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "text", "text": "say hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]},
    ]


CLIPS = {"a": [1.3], "c": [0.5, 1.25], "d": [31.0], "e": [0.7]}
"""Samples with audio and their clip lengths (s): ``d`` spans two 30 s windows, ``c`` is a two-clip chat."""


def write_split(folder: Path) -> Path:
    """A prepared split of two shards: one clip, text only, two clips / two windows, one clip, corrupt audio."""

    def record(key: str, seconds: list[float], messages=None) -> dict:
        rec = {"corpus": "toy", "task": "asr", "duration_s": sum(seconds), "messages": messages}
        rec["messages"] = messages or asr_messages(f"words of {key}")
        if len(seconds) > 1:
            rec["audio_durations_s"] = seconds
        return rec

    with ShardWriter(folder, "toy-train", max_samples_per_shard=3) as writer:
        writer.write("a", encode_flac(_wave(1.3, 1)), record("a", [1.3]))
        writer.write("b", None, record("b", [], _text_messages()) | {"task": "text", "duration_s": 0.0})
        writer.write(
            "c",
            [encode_flac(_wave(0.5, 2)), encode_flac(_wave(1.25, 3))],
            record("c", [0.5, 1.25], _two_clip_messages()),
        )
        writer.write("d", encode_flac(_wave(31.0, 4)), record("d", [31.0]))
        writer.write("e", encode_flac(_wave(0.7, 5)), record("e", [0.7]))
        writer.write("f", b"fLaC" + b"\x00" * 80, record("f", [1.0]))
    write_manifest(
        folder,
        build_manifest(corpus="toy", split="train", shards=writer.shards, durations_s=writer.durations_s),
    )
    return folder


@pytest.fixture
def split(tmp_path) -> Path:
    return write_split(tmp_path / "toy" / "train")


def _cache(model, split: Path, dtype: str = "float32") -> dict:
    return cache_split(split, model.encoder, model.feature_extractor, dtype=dtype, progress=False)


def _encode_clip(model, wave: np.ndarray) -> torch.Tensor:
    """The encoder's frames of one clip, windows back to back, computed alone (the reference)."""
    counter = model.audio_token_counter()
    lengths = torch.tensor(counter.window_lengths(len(wave)))
    with torch.no_grad():
        feats, flen = model.compute_features(torch.from_numpy(to_pcm16(wave)), lengths)
        hidden, frames = model.encoder(feats, flen)
    return torch.cat([hidden[i, :n] for i, n in enumerate(frames.tolist())])


# ------------------------------------------------------------------------------------------ the cache


def test_cache_holds_each_clips_encoder_frames_readable_by_webdataset(make_model, split):
    model = make_model(freeze=FROZEN)
    manifest = _cache(model, split, dtype="float16")
    folder = Path(manifest["folder"])
    assert folder == cache_dir(split, model_encoder_fingerprint(model))
    assert folder.parent.name == "train.encoder_cache" and folder.parent.parent == split.parent
    assert manifest["fingerprint"] == model_encoder_fingerprint(model).sha256
    assert (manifest["num_samples"], manifest["text_only"], manifest["rejected_counts"]) == (
        4,
        1,
        {"corrupt_audio": 1},
    )
    assert [r["key"] for r in manifest["rejected"]] == ["toy-train-000001.tar:f"]
    assert [s["name"] for s in manifest["shards"]] == ["toy-train-000000.tar", "toy-train-000001.tar"]
    assert manifest["audio_s"] == pytest.approx(sum(sum(c) for c in CLIPS.values()))
    frames = {k: [int(np.ceil(np.ceil(w * SR / 160) / 2)) for w in v] for k, v in CLIPS.items()}
    frames["d"] = [1500 + 50]  # two windows: 30 s (1500 frames) + 1 s (50)
    # the plain WebDataset reader decodes the shards; text-only b and corrupt f have no entry
    read = {}
    for s in wds.WebDataset(
        [str(folder / s["name"]) for s in manifest["shards"]], shardshuffle=False
    ).decode():
        read[s["__key__"]] = s
    assert sorted(read) == ["a", "c", "d", "e"]
    assert read["c"]["json"]["clip_samples"] == [8000, 20000] and read["c"]["json"]["frames"] == frames["c"]
    assert read["c"]["0.npy"].shape == (frames["c"][0], 64) and read["c"]["1.npy"].shape == (
        frames["c"][1],
        64,
    )
    assert read["d"]["npy"].shape == (1550, 64) and read["d"]["npy"].dtype == np.float16
    for key in ("a", "d"):
        want = _encode_clip(model, _wave(CLIPS[key][0], {"a": 1, "d": 4}[key]))
        torch.testing.assert_close(torch.from_numpy(read[key]["npy"]).float(), want, atol=2e-3, rtol=2e-3)
    # float16: D * 2 bytes per frame at 50 frames/s, plus tar and npy headers
    assert 50 * 64 * 2 <= manifest["bytes_per_audio_s"] < 50 * 64 * 2 * 1.5


def test_bfloat16_cache_round_trips_through_the_reader(make_model, split):
    model = make_model(freeze=FROZEN)
    _cache(model, split, "bfloat16")
    cached = resolve_cache(split, model_encoder_fingerprint(model))
    reader = EncoderCacheReader(cached.shards, cached.dtype, cached.hidden_size, cached.build_rejects)
    raw = next(
        r for r in iter_tar(str(split / "toy-train-000000.tar"), RejectCounter()) if r["__key__"] == "a"
    )
    frames, samples = reader.read(
        parse_sample(raw, RejectCounter()), RejectCounter(), model.audio_token_counter()
    )
    assert frames[0].dtype == torch.bfloat16 and samples == [round(1.3 * SR)]
    want = _encode_clip(model, _wave(1.3, 1))
    assert torch.equal(frames[0], want.to(torch.bfloat16))  # rounded once, stored bit for bit


def test_a_rerun_keeps_finished_shards_and_rebuilds_a_damaged_one(make_model, split):
    model = make_model(freeze=FROZEN)
    first = _cache(model, split)
    folder = Path(first["folder"])
    kept = folder / "toy-train-000000.tar"
    damaged = folder / "toy-train-000001.tar"
    mtime = kept.stat().st_mtime_ns
    damaged.write_bytes(damaged.read_bytes()[:1000])
    second = _cache(model, split)
    assert kept.stat().st_mtime_ns == mtime
    assert damaged.stat().st_size == first["shards"][1]["size_bytes"]
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]  # deterministic


def test_the_fingerprint_follows_weights_and_settings_not_the_attention_backend(make_model):
    base = model_encoder_fingerprint(make_model())
    assert model_encoder_fingerprint(make_model(attn_implementation="eager")).sha256 == base.sha256
    assert model_encoder_fingerprint(make_model(freeze=FROZEN)).sha256 == base.sha256
    changed = make_model()
    with torch.no_grad():
        changed.encoder.encoder.layers[1].fc1.weight[0, 0] += 1e-3
    assert model_encoder_fingerprint(changed).sha256 != base.sha256
    padded = model_encoder_fingerprint(make_model(encoder_kwargs={"padding_free": False}))
    assert padded.sha256 != base.sha256 and padded.details["adapter"] == {"padding_free": False}
    assert padded.details["features"]["settings"] == {"num_mel_bins": 80, "pad_to_window": True}


# ------------------------------------------------------------------------------------------ exactness


def _batches(model, split: Path, n: int, encoder_cache: dict | None) -> tuple[list[dict], RejectCounter]:
    stream = TrainStream(
        {"toy": [str(p) for p in sorted(split.glob("*.tar"))]},
        {"toy": 1.0},
        model.tokenizer,
        model.audio_token_counter(),
        mode="packed",
        packing_length=700,
        buffer_size=12,
        seed=4,
        encoder_cache=encoder_cache,
    )
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model.forward_batch(batch)
    loss = out.loss_sum / out.num_target_tokens
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_a_cached_step_equals_the_uncached_step_in_fp32(make_model, split):
    """Loss and every projector and LLM gradient of each batch match to 1e-5; the batches hold a two-window clip, a
    two-clip chat and a text-only chat, and both paths skip the corrupt clip as corrupt_audio."""
    model = make_model(freeze=FROZEN)
    _cache(model, split, dtype="float32")
    cached = resolve_cache(split, model_encoder_fingerprint(model))
    args = {
        "shards": cached.shards,
        "dtype": cached.dtype,
        "hidden_size": cached.hidden_size,
        "build_rejects": cached.build_rejects,
    }
    plain = _batches(model, split, 6, None)
    fast = _batches(model, split, 6, args)
    rejected = plain[-1]["data_state"]["rejects"]
    assert fast[-1]["data_state"]["rejects"] == rejected and set(rejected) == {"corrupt_audio"}
    keys = [k for b in fast for k in b["keys"]]
    assert {"b", "c", "d"} <= set(keys)
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    for a, b in zip(plain, fast):
        assert a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
        assert "audio_pcm" not in b or b["audio_pcm"].numel() == 0
        assert torch.equal(a["window_lengths"], b["window_lengths"])
        assert torch.equal(a["audio_samples"], b["audio_samples"])
        encoder_calls = len(calls)
        loss_b, grads_b = _step(model, b)
        assert len(calls) == encoder_calls  # the cached step never runs the encoder
        loss_a, grads_a = _step(model, a)
        torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
        assert grads_a.keys() == grads_b.keys()
        assert any(n.startswith("projector.") for n in grads_a) and any(n.startswith("llm.") for n in grads_a)
        assert not any(n.startswith("encoder.") for n in grads_a)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5, msg=name)


def test_a_float16_cache_changes_the_loss_only_by_its_rounding(make_model, split):
    model = make_model(freeze=FROZEN)
    _cache(model, split, dtype="float16")
    cached = resolve_cache(split, model_encoder_fingerprint(model))
    args = {
        "shards": cached.shards,
        "dtype": "float16",
        "hidden_size": 64,
        "build_rejects": cached.build_rejects,
    }
    for a, b in zip(_batches(model, split, 3, None), _batches(model, split, 3, args)):
        assert b["encoder_states"].dtype == torch.float16
        with torch.no_grad():
            la, lb = model.forward_batch(a).loss_sum, model.forward_batch(b).loss_sum
        assert float(abs(la - lb) / la) < 1e-3


# ------------------------------------------------------------------------------------------ missing entries


def _without(src: Path, dst: Path, key: str) -> None:
    """Copy a cache shard without ``key``'s members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if m.name.partition(".")[0] != key:
                tout.addfile(m, tin.extractfile(m))


def test_a_sample_missing_from_the_cache_is_skipped_and_counted(make_model, split, tmp_path):
    model = make_model(freeze=FROZEN)
    _cache(model, split)
    cached = resolve_cache(split, model_encoder_fingerprint(model))
    shard = str((split / "toy-train-000001.tar").resolve())
    _without(Path(cached.shards[shard]), tmp_path / "holey.tar", "e")
    shards = cached.shards | {shard: str(tmp_path / "holey.tar")}
    reader = EncoderCacheReader(shards, cached.dtype, cached.hidden_size, cached.build_rejects)
    rejects = RejectCounter()
    items = {r["__key__"]: parse_sample(r, rejects) for r in iter_tar(shard, rejects)}
    counter = model.audio_token_counter()
    assert reader.read(items["e"], rejects, counter) is None
    assert reader.read(items["f"], rejects, counter) is None  # skipped by the build: counted with its reason
    frames, samples = reader.read(items["d"], rejects, counter)
    assert rejects == {"missing_cache_entry": 1, "corrupt_audio": 1}
    assert [tuple(f.shape) for f in frames] == [(1550, 64)] and samples == [31 * SR]
    # in the stream: e never reaches a batch, and the reason is in the data state
    args = {"shards": shards, "dtype": cached.dtype, "hidden_size": 64, "build_rejects": cached.build_rejects}
    batches = _batches(model, split, 6, args)
    assert "e" not in {k for b in batches for k in b["keys"]}
    assert batches[-1]["data_state"]["rejects"]["missing_cache_entry"] >= 1


def test_an_entry_whose_frames_do_not_fit_its_clip_is_a_bad_cache_entry(make_model, split, tmp_path):
    model = make_model(freeze=FROZEN)
    _cache(model, split)
    cached = resolve_cache(split, model_encoder_fingerprint(model))
    shard = str((split / "toy-train-000000.tar").resolve())
    bad = tmp_path / "bad.tar"
    with tarfile.open(cached.shards[shard]) as tin, tarfile.open(bad, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == "a.npy":
                arr = np.load(io.BytesIO(data))[:-1]  # one frame short
                buf = io.BytesIO()
                np.save(buf, arr)
                data = buf.getvalue()
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    reader = EncoderCacheReader({shard: str(bad)}, cached.dtype, 64)
    rejects = RejectCounter()
    raw = next(r for r in iter_tar(shard, rejects) if r["__key__"] == "a")
    assert reader.read(parse_sample(raw, rejects), rejects, model.audio_token_counter()) is None
    assert rejects == {"bad_cache_entry": 1}


# ------------------------------------------------------------------------------------------ refusals


def _fit(model, split: Path, max_steps: int = 2, unfreeze=None) -> L.Trainer:
    dm = AeroDataModule(
        train={"toy": {"dir": str(split), "weight": 1.0}},
        packing={"mode": "packed", "packing_length": 700, "buffer_size": 12},
        num_workers=1,  # the stream crosses into a worker process, which opens the cache itself
        encoder_cache=True,
    )
    dm.check()
    dm.bind_model(model.tokenizer, model.audio_token_counter())
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(AeroLitModule(model, lr=1e-3, warmup_steps=1, unfreeze=unfreeze), datamodule=dm)
    return trainer


def test_fit_on_the_cache_trains_without_running_the_encoder(make_model, split):
    model = make_model(freeze=FROZEN)
    _cache(model, split, dtype="float16")
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    trainer = _fit(model, split, max_steps=2)
    assert trainer.global_step == 2 and calls == []
    assert all(not torch.equal(v, before[k]) for k, v in model.projector.state_dict().items())


def test_a_cache_of_another_encoder_is_refused(make_model, split):
    _cache(make_model(freeze=FROZEN), split)
    other = make_model(freeze=FROZEN)
    with torch.no_grad():
        other.encoder.encoder.layers[0].fc2.bias[0] += 0.5
    with pytest.raises(UserValueError, match="differ in: weights_sha256") as err:
        _fit(other, split)
    assert model_encoder_fingerprint(other).short in str(err.value)
    assert "python -m aero_lightning.data.cache_encoder" in str(err.value)


def test_an_encoder_that_trains_is_refused(make_model, split):
    _cache(make_model(freeze=FROZEN), split)
    with pytest.raises(UserValueError, match=r"needs a frozen encoder.*model\.freeze"):
        _fit(make_model(freeze=[r"^llm\."]), split)
    later = {"at_step": 5, "patterns": [r"^encoder\.encoder\.layers\.1\."]}
    with pytest.raises(UserValueError, match="module.unfreeze.patterns"):
        _fit(make_model(freeze=FROZEN), split, unfreeze=later)
    # an unfreeze stage that leaves the encoder alone is fine
    check_encoder_frozen(make_model(freeze=[*FROZEN, r"^llm\."]).named_parameters(), [r"^llm\."])


def test_a_missing_or_stale_cache_is_refused_before_training(make_model, split):
    dm = AeroDataModule(train={"toy": {"dir": str(split), "weight": 1.0}}, encoder_cache=True)
    with pytest.raises(UserFileNotFoundError, match="has no encoder cache"):
        dm.check()
    model = make_model(freeze=FROZEN)
    _cache(model, split)
    dm.check()
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64  # as if the split had been rebuilt since
    (split / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        UserValueError, match="toy-train-000001.tar: the audio shard was rebuilt after the cache"
    ):
        resolve_cache(split, model_encoder_fingerprint(model))


# ------------------------------------------------------------------------------------------ CLI


def test_cli_builds_the_cache_a_training_model_accepts(make_model, split, tiny_dir, capsys):
    model = make_model(freeze=FROZEN)
    manifest = main(
        [
            f"split={split}",
            f"encoder={tiny_dir / 'encoder'}",
            "dtype=bfloat16",
            "progress=false",
            "batch_seconds=10",
        ]
    )
    assert manifest["fingerprint"] == model_encoder_fingerprint(model).sha256
    assert resolve_cache(split, model_encoder_fingerprint(model)).dtype == "bfloat16"
    with pytest.raises(SystemExit) as exit_:
        main([f"split={split}", "encoder=/no/such/encoder"])
    assert exit_.value.code == 2 and "cannot load the encoder '/no/such/encoder'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([f"split={split}", f"encoder={tiny_dir / 'encoder'}", "dtype=int8"])
    assert exit_.value.code == 2 and "dtype must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([f"split={split}"])
    assert exit_.value.code == 2 and "encoder= is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([f"split={split / 'nope'}", f"encoder={tiny_dir / 'encoder'}"])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_init_from_takes_the_encoder_of_a_training_run(make_model, split, tiny_dir, tmp_path):
    trained = make_model()
    with torch.no_grad():
        trained.encoder.encoder.conv1.weight.mul_(1.5)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    model = make_model(freeze=FROZEN, init_from={"ckpt": str(ckpt), "include": [r"^encoder\."]})
    manifest = main(
        [f"split={split}", f"encoder={tiny_dir / 'encoder'}", f"init_from={ckpt}", "progress=false"]
    )
    assert manifest["fingerprint"] == model_encoder_fingerprint(model).sha256
    assert manifest["fingerprint"] != model_encoder_fingerprint(make_model()).sha256


def test_lora_on_the_llm_keeps_the_cache_and_lora_in_the_encoder_is_refused(make_model):
    """Stage 2 of the tiny-audio recipe (LoRA on the frozen LLM) reads the same cache; adapters inside the encoder
    train it, so its outputs would move: refused."""
    llm_lora = {"target_modules": [r"^llm\.model\.layers\.\d+\.self_attn\.(q|v)_proj$"], "r": 4, "alpha": 8}
    with_llm_lora = make_model(freeze=[*FROZEN, r"^llm\."], lora=llm_lora)
    check_encoder_frozen(with_llm_lora.named_parameters(), (), with_llm_lora.fixed_parameters)
    assert model_encoder_fingerprint(with_llm_lora).sha256 == model_encoder_fingerprint(make_model()).sha256
    encoder_lora = {"target_modules": [r"^encoder\.encoder\.layers\.\d+\.fc1$"], "r": 4, "alpha": 8}
    with_encoder_lora = make_model(freeze=FROZEN, lora=encoder_lora)
    with pytest.raises(UserValueError, match=r"needs a frozen encoder.*lora_A.*model/lora=llm"):
        check_encoder_frozen(with_encoder_lora.named_parameters(), (), with_encoder_lora.fixed_parameters)
