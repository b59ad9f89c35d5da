"""LoRA through peft (aero_lightning/model/lora.py, conf/model/lora/): what trains, freeze/unfreeze/lr_groups with
the renamed parameters, checkpoints and init_from with adapters, the merged transformers export, and 2-process DDP /
FSDP2 / ZeRO-2 against 1 process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.aero_runs import compose_train
from helpers.ddp_grads import documents
from helpers.dist_train import run as dist_run
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from aero_lightning.data.datamodule import AccumulationGroups
from aero_lightning.data.packing import collate_packed
from aero_lightning.errors import UserValueError
from aero_lightning.hf.export import export, remote_code_files
from aero_lightning.lit_module import AeroLitModule
from aero_lightning.model.build import load_model, load_weights_from, save_run_model
from aero_lightning.model.freeze import unfreezable
from aero_lightning.model.lora import is_adapter_name, lora_layers, map_lora_names, merged_state_dict

ROOT = Path(__file__).resolve().parents[2]
FREEZE_ALL = [r"^encoder\.", r"^llm\."]


def lora_conf(name: str, **changes) -> dict:
    """``model.lora`` as ``model/lora=<name>`` composes it (the real conf/model/lora/<name>.yaml)."""
    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "lora" / f"{name}.yaml"))
    return spec | changes


def randomise_adapters(model, seed: int = 1, scale: float = 0.05) -> None:
    """Non-zero adapters (peft starts B at zero, where LoRA changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_name(name):
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def packed_batch(model, docs=None):
    return collate_packed(docs or documents(model), model.audio_token_counter())


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward_batch(batch, return_logits=True).logits


# ------------------------------------------------------------------------------------------------ config + build


def test_config_group_composes_and_defaults_to_none(tiny_dir, tmp_path):
    base = compose_train(tmp_path, ("experiment=demo", f"paths.demo_model_dir={tiny_dir}"))
    assert base.model.lora.target_modules is None  # model/lora=none is the default
    cfg = compose_train(
        tmp_path, ("experiment=demo", f"paths.demo_model_dir={tiny_dir}", "model/lora=llm", "model.lora.r=4")
    )
    model = instantiate(cfg.model, _convert_="all")
    assert model.lora == {**lora_conf("llm"), "r": 4, "alpha": 32.0}
    # every attention and MLP projection of both LLM layers, nothing else
    names = [f"llm.model.layers.{i}.{m}" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    assert sorted(model.lora_layers) == sorted(names)
    assert model.llm.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (4, 64)


def test_llm_encoder_wraps_whisper_and_hubert_layers(make_model, tmp_path):
    from helpers.ssl_tiny import build_tiny_ssl

    whisper = make_model(lora=lora_conf("llm_encoder"))
    enc = sorted(n for n in whisper.lora_layers if n.startswith("encoder."))
    assert (
        len(enc) == 2 * 6
        and "encoder.encoder.layers.1.fc2" in enc
        and "encoder.encoder.layers.0.self_attn.out_proj" in enc
    )
    hubert = make_model(
        encoder_kwargs={"type": "hubert", "name_or_path": str(build_tiny_ssl(tmp_path / "hubert"))},
        lora=lora_conf("llm_encoder"),
    )
    enc = sorted(n for n in hubert.lora_layers if n.startswith("encoder."))
    assert len(enc) == 2 * 6 and "encoder.encoder.encoder.layers.0.feed_forward.intermediate_dense" in enc
    assert "encoder.encoder.encoder.layers.1.attention.q_proj" in enc


def test_lora_none_changes_nothing(make_model):
    plain, none = make_model(freeze=FREEZE_ALL), make_model(freeze=FREEZE_ALL, lora=lora_conf("none"))
    assert not lora_layers(none) and none.lora is None and none.lora_layers == []
    assert not hasattr(none, "peft_config")
    assert [(n, p.requires_grad) for n, p in none.named_parameters()] == [
        (n, p.requires_grad) for n, p in plain.named_parameters()
    ]
    assert none.fixed_parameters == plain.fixed_parameters
    assert all(torch.equal(a, b) for a, b in zip(none.state_dict().values(), plain.state_dict().values()))


def test_requires_grad_follows_freeze_and_adapters_always_train(make_model):
    model = make_model(freeze=[r"^encoder\."], lora=lora_conf("llm"))
    for name, p in model.named_parameters():
        if is_adapter_name(name):
            assert p.requires_grad, name
        elif ".base_layer." in name:
            assert not p.requires_grad and name in model.fixed_parameters, name
        elif name.startswith("encoder."):
            assert not p.requires_grad, name
        else:  # projector and the LLM's unwrapped weights (embedding, norms): model.freeze left them trainable
            assert p.requires_grad, name
    # the LLM has trainable adapters, so it is not a frozen component: train mode, LoRA dropout active
    assert model.frozen_components == ["encoder"]
    model.train()
    assert model.llm.training and not model.encoder.training


def test_unfreeze_never_reaches_the_wrapped_base_weights(make_model):
    model = make_model(freeze=FREEZE_ALL, lora=lora_conf("llm"))
    later = unfreezable(model, [r"^llm\."], model.fixed_parameters)
    assert later and not any(".base_layer." in n or is_adapter_name(n) for n in later)
    assert "llm.model.embed_tokens.weight" in later and "llm.model.norm.weight" in later
    with pytest.raises(ValueError, match="LoRA-wrapped layers never unfreeze"):
        unfreezable(model, [r"q_proj\.base_layer\."], model.fixed_parameters)


def test_bad_lora_options_are_user_errors(make_model):
    with pytest.raises(UserValueError, match="matches no module"):
        make_model(lora=lora_conf("llm", target_modules=[r"^llm\.model\.layers\.\d+\.attn\.q$"]))
    with pytest.raises(UserValueError, match="not nn.Linear"):
        make_model(lora=lora_conf("llm", target_modules=[r"llm\.model\.layers\.0\.mlp"]))
    with pytest.raises(UserValueError, match="unknown keys"):
        make_model(lora=lora_conf("llm", rank=8))
    with pytest.raises(UserValueError, match="r >= 1"):
        make_model(lora=lora_conf("llm", r=0))
    with pytest.raises(ValueError, match="ctc_only trains the encoder alone"):
        make_model(lora=lora_conf("llm"), ctc_weight=1.0, ctc_only=True)


# ------------------------------------------------------------------------------------------------ training


def test_steps_change_only_adapters_and_projector(make_model):
    """3 AdamW steps through AeroLitModule with model/lora=llm, encoder and LLM frozen: exactly the adapters and the
    projector moved, every other tensor is bit-identical; lr_groups patterns see the adapters' names."""
    model = make_model(freeze=FREEZE_ALL, lora=lora_conf("llm"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = packed_batch(model)
    module = AeroLitModule(model, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, lr_groups={"lora_": 2e-2})
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=AccumulationGroups([dict(batch) for _ in range(3)], 1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if is_adapter_name(k) or k.startswith("projector.")}
    assert len(expected) == 2 * 7 * 2 + 4  # 2 layers x 7 projections x (A, B) + the projector
    assert changed == expected
    lrs = {id(p): g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert {lrs[id(p)] for n, p in params.items() if is_adapter_name(n)} == {2e-2}
    assert {lrs[id(p)] for n, p in params.items() if n.startswith("projector.")} == {1e-2}
    assert len(lrs) == len(expected)  # frozen weights are not in the optimizer


def test_activation_checkpointing_gives_the_same_adapter_gradients(make_model):
    """Non-reentrant checkpointing of the frozen encoder and LLM layers still gives every adapter its gradient."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make_model(
            freeze=FREEZE_ALL,
            lora=lora_conf("llm_encoder", dropout=0.0),
            gradient_checkpointing=checkpointing,
        )
        randomise_adapters(model)
        model.train()
        model.forward_batch(packed_batch(model)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == 2 * 26 + 4 and all(g is not None and g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-7, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------- checkpoints, init_from


def _lightning_ckpt(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 7}, path
    )
    return path


def test_init_from_a_lora_checkpoint_restores_adapters_exactly(make_model, tmp_path):
    source = make_model(freeze=FREEZE_ALL, lora=lora_conf("llm"))
    randomise_adapters(source)
    with torch.no_grad():
        source.projector.fc1.weight.add_(1.0)
    ckpt = _lightning_ckpt(source, tmp_path / "run" / "checkpoints" / "last.ckpt")
    target = make_model(
        freeze=FREEZE_ALL,
        lora=lora_conf("llm"),
        init_from={"ckpt": str(ckpt), "include": ["lora_", r"^projector\."]},
    )
    src, got = source.state_dict(), target.state_dict()
    adapters = [k for k in src if is_adapter_name(k)]
    assert len(adapters) == 28 and any(src[k].abs().sum() > 0 for k in adapters)
    for k in adapters + [k for k in src if k.startswith("projector.")]:
        assert torch.equal(got[k], src[k]), k
    # the source run's adapters cannot go into a model without LoRA: a clear error, not a silent skip
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        make_model(init_from={"ckpt": str(ckpt), "include": [r"^llm\."]})


def test_init_from_plain_run_loads_into_the_wrapped_base_weights(make_model, tmp_path):
    plain = make_model()
    with torch.no_grad():
        plain.llm.model.layers[1].self_attn.q_proj.weight.mul_(2.0)
    ckpt = _lightning_ckpt(plain, tmp_path / "plain.ckpt")
    lora = make_model(lora=lora_conf("llm"))
    copied = load_weights_from(lora, ckpt, [r"^llm\."])
    assert "llm.model.layers.1.self_attn.q_proj.base_layer.weight" in copied
    assert torch.equal(
        lora.llm.model.layers[1].self_attn.q_proj.base_layer.weight,
        plain.llm.model.layers[1].self_attn.q_proj.weight,
    )
    assert map_lora_names(
        ["a.q.weight", "a.q.base_layer.weight", "a.q.lora_A.default.weight"], ["a.q.weight"]
    ) == {
        "a.q.weight": "a.q.weight",
        "a.q.base_layer.weight": "a.q.weight",
    }


def test_checkpoint_loads_for_inference_with_its_adapters(make_model, tmp_path):
    """A LoRA run's checkpoint through load_model (the run's model/ folder records model.lora): same adapters,
    same logits."""
    model = make_model(freeze=FREEZE_ALL, lora=lora_conf("llm_encoder"))
    randomise_adapters(model)
    save_run_model(model, tmp_path / "run" / "model")
    assert json.loads((tmp_path / "run" / "model" / "aero_model.json").read_text())["lora"] == model.lora
    ckpt = _lightning_ckpt(model, tmp_path / "run" / "checkpoints" / "last.ckpt")
    loaded = load_model(ckpt, device="cpu")
    assert loaded.lora_layers == model.lora_layers
    batch = packed_batch(model)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------- export


def test_export_merges_adapters_and_matches_unmerged_logits(make_model, tmp_path, monkeypatch):
    from transformers import AutoFeatureExtractor, AutoModel

    from aero_lightning.data.chat import encode_chat
    from aero_lightning.eval.decode import user_messages

    model = make_model(freeze=FREEZE_ALL, lora=lora_conf("llm_encoder"))
    randomise_adapters(model)
    model.train()  # as after training: export's own check (verify) must compare without LoRA dropout
    out = export(model, tmp_path / "hf")
    assert model.training and model.lora_layers and lora_layers(model)  # the source model is left as it was

    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    merged = merged_state_dict(model)
    q = "llm.model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(q)
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(weights[f"{q}.weight"], expected, atol=1e-6, rtol=0)  # alpha / r = 32 / 16
    assert torch.equal(weights[f"{q}.weight"], merged[f"{q}.weight"])
    assert not any("peft" in source for source in remote_code_files().values())

    monkeypatch.setitem(sys.modules, "peft", None)  # loading the export must not need peft
    hf = AutoModel.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    fe = AutoFeatureExtractor.from_pretrained(str(out), trust_remote_code=True)
    wave = documents(model)[3]["waveform"]
    feats = fe(wave, sampling_rate=16000)
    ids = torch.tensor(
        [encode_chat(model.tokenizer, user_messages(), [int(feats["num_audio_tokens"][0])],
                     add_generation_prompt=True).input_ids]
    )  # fmt: skip
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        ref = model(
            **kwargs, input_features=feats["input_features"], feature_lengths=feats["feature_lengths"]
        ).logits
        got = hf(
            **kwargs, input_features=feats["input_features"], feature_lengths=feats["feature_lengths"]
        ).logits
        # not vacuous: without its adapters the model gives other logits
        for m in lora_layers(model).values():
            m.enable_adapters(False)  # peft's switch: the base layer alone
        base = model(
            **kwargs, input_features=feats["input_features"], feature_lengths=feats["feature_lengths"]
        )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (base.logits - ref).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------- distributed

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
DIST_LORA = {"freeze": FREEZE_ALL, "lora": lora_conf("llm_encoder", dropout=0.0)}


def _dist_train(tiny_dir: Path, out: Path, strategy: str, world: int, micro: int, accum: int) -> dict:
    """tests/helpers/dist_train.py (Lightning launches the extra ranks): 3 AdamW steps at lr 1e-3 with LoRA."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DIST_TRAIN_MODEL": json.dumps(DIST_LORA)}
    args = [str(tiny_dir), str(out), strategy, str(world), str(micro), str(accum), "3", "1e-3"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "dist_train.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def lora_reference(tiny_dir):
    """One process, the 4 documents in one micro-batch (in this process: the same code path, no start-up cost)."""
    return dist_run(tiny_dir, "auto", 1, 4, 1, 3, 1e-3, model_kwargs=DIST_LORA).result()


def _same_training(run: dict, ref: dict) -> None:
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert ref["losses"][2] < ref["losses"][0]
    assert run["trained"].keys() == ref["trained"].keys()
    adapters = [k for k in ref["trained"] if is_adapter_name(k)]
    assert len(adapters) == 2 * (14 + 12) and len(ref["trained"]) == len(adapters) + 4  # + the projector
    for name in ref["trained"]:
        torch.testing.assert_close(run["trained"][name], ref["trained"][name], atol=1e-6, rtol=1e-4, msg=name)
    for name in ref["grads"]:
        torch.testing.assert_close(run["grads"][name], ref["grads"][name], atol=1e-6, rtol=1e-4, msg=name)


def test_lora_ddp_two_processes_equal_one_process(tiny_dir, lora_reference, tmp_path):
    """DDP, 2 gloo processes x 2 accumulation steps of 1 document, LoRA on encoder and LLM: the same loss every step,
    the same gradients and the same adapters after 3 steps."""
    _same_training(_dist_train(tiny_dir, tmp_path / "ddp.pt", "ddp", 2, 1, 2), lora_reference)


@pytest.mark.slow
def test_lora_fsdp2_two_processes_equal_one_process(tiny_dir, lora_reference, tmp_path):
    """FSDP2 (per-block fully_shard, the LoRA layers inside the blocks), 2 gloo processes: adapters are sharded
    DTensors and train as in one process."""
    run = _dist_train(tiny_dir, tmp_path / "fsdp2.pt", "fsdp2", 2, 2, 1)
    assert all(run["sharded"][f"model.{n}"] for n in run["trained"])
    _same_training(run, lora_reference)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install -e '.[dev]')")
def test_lora_deepspeed_zero2_two_processes_equal_one_process(tiny_dir, lora_reference, tmp_path):
    """ZeRO-2 on DeepSpeed's CPU accelerator, 2 processes x 2 accumulation steps: frozen base weights stay out of
    the partitioned optimizer, the adapters train as in one process."""
    _same_training(_dist_train(tiny_dir, tmp_path / "zero2.pt", "deepspeed", 2, 1, 2), lora_reference)
