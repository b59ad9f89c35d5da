"""Distributed strategies on CPU: DDP and FSDP2 with 2 gloo processes against 1 process on the same global batch;
DeepSpeed ZeRO configs, strategy objects, and ZeRO-2 training on DeepSpeed's CPU accelerator (accumulation scaled
once, unlike Lightning's stock DeepSpeedStrategy)."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ddp_grads import documents
from helpers.tiny import build_tiny  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.strategies.deepspeed import _format_precision_config

from aero_lightning.data.packing import collate_packed
from aero_lightning.model.build import build_aero_model, checkpoint_kind, load_model, sharded_model_weights
from aero_lightning.model.projector import MLPStackProjector
from aero_lightning.strategies import (
    FSDP2AeroLitModule,
    FSDP2Strategy,
    deepspeed_config,
    transformer_blocks,
)
from aero_lightning.tasks.train import build_strategy

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed not installed (pip install -e '.[dev]')"
)
STEPS, LR = 3, 1e-3


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _train(
    tiny_dir: Path,
    out: Path,
    strategy: str,
    world: int,
    micro: int,
    accum: int,
    precision="32-true",
    extensions_dir: Path | None = None,
    run_dir: Path | None = None,
):
    """tests/helpers/dist_train.py in a subprocess (Lightning launches the extra ranks); rank 0's capture.

    ``extensions_dir``: ``TORCH_EXTENSIONS_DIR`` of the run, where a DeepSpeed JIT op build would land.
    ``run_dir``: save the trained model there as a run folder (dist_train.save_run).
    """
    env = {
        k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    args = [
        str(tiny_dir),
        str(out),
        strategy,
        str(world),
        str(micro),
        str(accum),
        str(STEPS),
        str(LR),
        precision,
        *([str(run_dir)] if run_dir is not None else []),
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "dist_train.py"), *args],
        cwd=ROOT,
        env=env
        | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        | ({"TORCH_EXTENSIONS_DIR": str(extensions_dir)} if extensions_dir is not None else {}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def _close_grads(a: dict, b: dict, scale: float = 1.0) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        torch.testing.assert_close(a[name], b[name] * scale, atol=1e-6, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """One process, the 4 documents in one micro-batch, 3 AdamW steps."""
    return _train(tiny_dir, tmp_path_factory.mktemp("ref") / "ref.pt", "auto", world=1, micro=4, accum=1)


def test_reference_loss_is_the_global_token_mean(tiny_dir, reference):
    """Step 1's loss = sum of every document's token losses / all target tokens, computed here directly."""
    torch.manual_seed(0)
    model = build_aero_model(
        encoder={"name_or_path": str(tiny_dir / "encoder")},
        llm={"name_or_path": str(tiny_dir / "llm")},
        projector=functools.partial(MLPStackProjector, stack_factor=4, hidden_dim=128),
        attn_implementation="varlen",
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in documents(model):  # each document alone
            out = model.forward_batch(collate_packed([doc], model.audio_token_counter()))
            total += float(out.loss_sum)
            count += int(out.num_target_tokens)
    assert reference["losses"][0] == pytest.approx(total / count, rel=1e-5)
    assert reference["losses"][2] < reference["losses"][0]  # it trains


def test_ddp_two_processes_equal_one_process(tiny_dir, reference, tmp_path):
    """DDP, 2 gloo processes x 2 accumulation steps of 1 document: same loss every step and same gradients."""
    ddp = _train(tiny_dir, tmp_path / "ddp.pt", "ddp", world=2, micro=1, accum=2)
    assert ddp["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    _close_grads(ddp["grads"], reference["grads"])
    assert ddp["generated"] == reference["generated"]


@pytest.fixture(scope="module")
def fsdp2_run(tiny_dir, tmp_path_factory):
    """FSDP2, 2 gloo processes, 2 documents each; the trained model saved as a run folder."""
    root = tmp_path_factory.mktemp("fsdp2")
    result = _train(tiny_dir, root / "fsdp2.pt", "fsdp2", world=2, micro=2, accum=1, run_dir=root / "run")
    return result, root / "run"


@pytest.fixture(scope="module")
def zero3_run(tiny_dir, tmp_path_factory):
    """ZeRO-3 (every parameter partitioned), 2 gloo processes x 2 accumulation steps of 1 document, with an empty
    TORCH_EXTENSIONS_DIR; the trained model saved as a run folder."""
    root = tmp_path_factory.mktemp("zero3")
    extensions = root / "torch_extensions"
    extensions.mkdir()
    result = _train(
        tiny_dir,
        root / "zero3.pt",
        "deepspeed_zero3",
        world=2,
        micro=1,
        accum=2,
        extensions_dir=extensions,
        run_dir=root / "run",
    )
    return result, root / "run", extensions


def test_fsdp2_two_processes_train_like_one(fsdp2_run, reference):
    """FSDP2 (per-layer fully_shard), 2 gloo processes: parameters are sharded DTensors, the loss falls, and every
    step's loss and the full gradients equal the single-process run."""
    fsdp, _ = fsdp2_run
    assert fsdp["sharded"] and all(fsdp["sharded"].values())
    assert fsdp["params"] == reference["params"]  # FLOP counting sees the full (global) parameter sizes
    assert fsdp["losses"][2] < fsdp["losses"][0]
    assert fsdp["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    _close_grads(fsdp["grads"], reference["grads"])
    # generate() gathers the root's parameters too (register_fsdp_forward_method): same greedy tokens
    assert fsdp["generated"] == reference["generated"] and len(fsdp["generated"][0]) == 4


@needs_deepspeed
def test_deepspeed_zero2_two_processes_with_accumulation_equal_one_process(tiny_dir, reference, tmp_path):
    """AeroDeepSpeedStrategy, ZeRO-2 over 2 gloo processes x 2 accumulation steps: the reference gradients.

    No DeepSpeed C++ op is JIT-built on the way (the harness disables the shared-memory allreduce kernel, a build
    of minutes on a small CPU): the run's TORCH_EXTENSIONS_DIR stays empty.
    """
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    zero2 = _train(
        tiny_dir, tmp_path / "zero2.pt", "deepspeed", world=2, micro=1, accum=2, extensions_dir=extensions
    )
    assert sorted(p.name for p in extensions.rglob("*")) == []
    _close_grads(zero2["grads"], reference["grads"])
    assert zero2["losses"] == pytest.approx(reference["losses"], rel=1e-5)


@needs_deepspeed
def test_deepspeed_zero3_two_processes_with_accumulation_equal_one_process(zero3_run, reference):
    """ZeRO-3 over 2 gloo processes x 2 accumulation steps, every parameter partitioned (persistence threshold 0):
    the reference losses, gradients and greedy tokens. The LM head weight is partitioned, so the chunked loss must
    project through the head module (its ZeRO-3 hooks gather the weight), also when a chunk is recomputed in the
    backward pass. FLOP counting sees the full parameter sizes (ds_numel), not the empty local tensors."""
    zero3, _, extensions = zero3_run
    assert sorted(p.name for p in extensions.rglob("*")) == []
    assert zero3["sharded"] and all(zero3["sharded"].values())
    assert zero3["local_numel"] == 0  # partitioned: rank 0 holds no whole parameter outside a forward
    assert zero3["params"] == reference["params"]
    llm = reference["params"]["llm"]  # tests/model/test_flops.py's LLM_LINEAR - HEAD, and HEAD
    assert (llm["trainable"], llm["head_trainable"]) == (73_728, 19_200)
    _close_grads(zero3["grads"], reference["grads"])
    assert zero3["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert zero3["generated"] == reference["generated"]


@pytest.mark.parametrize(
    ("run", "kind"),
    [("fsdp2_run", "distributed"), pytest.param("zero3_run", "deepspeed", marks=needs_deepspeed)],
)
def test_load_model_consolidates_sharded_checkpoints(run, kind, request, tmp_path):
    """The trained model, saved by the strategy as a folder of shards (FSDP2: torch.distributed.checkpoint;
    ZeRO-3: DeepSpeed), loads for inference through load_model with exactly the weights it had after training
    (gathered by the training script): from the checkpoint folder, from the run folder, and from a run folder whose
    last.ckpt is a link to the step folder (save_last: link)."""
    run_dir = request.getfixturevalue(run)[1]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_kind(last) == kind
    trained = torch.load(run_dir / "full_state.pt")
    weights, step = sharded_model_weights(last)
    assert step == STEPS
    assert weights.keys() == trained.keys() and len(trained) == 68
    for name, value in trained.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)

    linked = tmp_path / "linked"
    (linked / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", linked / "config.yaml")
    shutil.copytree(last, linked / "checkpoints" / "step0000003.ckpt")
    (linked / "checkpoints" / "last.ckpt").symlink_to("step0000003.ckpt")  # relative, as Lightning links
    for source in (last, run_dir, linked):
        model = load_model(source, device="cpu")
        state = model.state_dict()
        assert state.keys() == trained.keys(), source
        for name, value in trained.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=f"{source}: {name}")


@needs_deepspeed
def test_stock_lightning_deepspeed_divides_by_accumulation_twice(tiny_dir, reference, tmp_path):
    """Lightning's own DeepSpeedStrategy: Lightning divides the loss by accumulate_grad_batches and
    DeepSpeedEngine.backward divides it again, so with 2 accumulation steps the gradient is half the true one."""
    stock = _train(tiny_dir, tmp_path / "stock.pt", "deepspeed_stock", world=1, micro=2, accum=2)
    _close_grads(stock["grads"], reference["grads"], scale=0.5)


@needs_deepspeed
def test_deepspeed_bf16_trains(tiny_dir, reference, tmp_path):
    bf16 = _train(
        tiny_dir, tmp_path / "bf16.pt", "deepspeed", world=1, micro=4, accum=1, precision="bf16-mixed"
    )
    assert bf16["losses"] == pytest.approx(reference["losses"], rel=5e-3)


# ---------------------------------------------------------------------------------------------- DeepSpeed configs
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_per_stage(stage):
    config = deepspeed_config(stage)
    zero = config["zero_optimization"]
    assert zero["stage"] == stage and zero["reduce_scatter"] and zero["overlap_comm"]
    assert ("allgather_bucket_size" in zero) == (stage < 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert config["zero_allow_untested_optimizer"] is True  # the module's torch AdamW
    assert config["train_micro_batch_size_per_gpu"] == 1
    assert "zero_force_ds_cpu_optimizer" not in config and "bf16" not in config


def test_deepspeed_config_cpu_offload():
    config = deepspeed_config(3, offload_optimizer=True, offload_parameters=True, pin_memory=False)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert config["zero_force_ds_cpu_optimizer"] is False  # torch AdamW may step on the CPU
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        deepspeed_config(2, offload_parameters=True)
    with pytest.raises(ValueError, match="ZeRO stage must be one of"):
        deepspeed_config(0)


@pytest.mark.parametrize("name", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_strategy_configs_compose_to_valid_deepspeed_configs(name):
    """conf/strategy/deepspeed_zero*.yaml -> the DeepSpeed config Lightning will hand DeepSpeed, bf16 included,
    checked without deepspeed and, when it is installed, by DeepSpeed's own config parser."""
    cfg = _compose(f"strategy={name}", "trainer.precision=bf16-mixed")
    stage = int(name[-1])
    assert (
        cfg.strategy._target_ == "aero_lightning.strategies.AeroDeepSpeedStrategy"
        and cfg.strategy.stage == stage
    )
    kwargs = {k: v for k, v in cfg.strategy.items() if k not in ("_target_", "config_overrides")}
    config = deepspeed_config(**kwargs)
    # what Lightning adds at fit time
    _format_precision_config(config, cfg.trainer.precision, 0, 1000, 1, 16, 2)
    config |= {"gradient_accumulation_steps": 4, "gradient_clipping": cfg.trainer.gradient_clip_val}
    assert config["bf16"] == {"enabled": True} and config["zero_optimization"]["stage"] == stage
    if HAS_DEEPSPEED:
        from deepspeed.runtime.config import DeepSpeedConfig

        parsed = DeepSpeedConfig(config)  # pydantic: unknown or invalid keys raise
        assert parsed.zero_optimization_stage == stage and parsed.bfloat16_config.enabled
        assert parsed.gradient_accumulation_steps == 4 and parsed.gradient_clipping == 1.0
        assert parsed.train_batch_size == 4  # micro-batch 1 x 4 steps x world 1
        offload = deepspeed_config(stage, offload_optimizer=True, offload_parameters=stage == 3)
        offload |= {"bf16": {"enabled": True}, "gradient_accumulation_steps": 1}
        parsed = DeepSpeedConfig(offload)
        assert parsed.zero_config.offload_optimizer.device == "cpu"
        assert (parsed.zero_config.offload_param is not None) == (stage == 3)


@needs_deepspeed
@pytest.mark.parametrize("name", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_strategy_objects_instantiate(name):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = build_strategy(_compose(f"strategy={name}").strategy)
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == int(name[-1])
    assert strategy.zero_stage_3 == (name == "deepspeed_zero3")
    offloaded = build_strategy(
        _compose(
            f"strategy={name}", "strategy.offload_optimizer=true", "+strategy.config_overrides.seed=3"
        ).strategy
    )
    assert offloaded.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offloaded.config["seed"] == 3


def test_deepspeed_missing_is_a_clear_error(monkeypatch):
    import lightning.pytorch.strategies.deepspeed as lightning_deepspeed
    from hydra.errors import InstantiationException

    monkeypatch.setattr(lightning_deepspeed, "_DEEPSPEED_AVAILABLE", False)
    with pytest.raises(InstantiationException, match="you must have DeepSpeed installed"):
        build_strategy(_compose("strategy=deepspeed_zero2").strategy)


# ---------------------------------------------------------------------------------------------- FSDP2 config
def test_fsdp2_config_selects_strategy_and_module():
    cfg = _compose("strategy=fsdp2")
    assert cfg.module._target_ == "aero_lightning.strategies.FSDP2AeroLitModule"
    strategy = build_strategy(cfg.strategy)
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.fsdp_kwargs == {
        "reshard_after_forward": True,
        "param_dtype": None,
        "reduce_dtype": None,
        "cpu_offload": False,
    }
    assert issubclass(
        instantiate({"_target_": "hydra.utils.get_class", "path": cfg.module._target_}), FSDP2AeroLitModule
    )


def test_transformer_blocks_are_every_encoder_and_llm_layer(model):
    blocks = transformer_blocks(model)
    enc, llm = list(model.encoder.encoder.layers), list(model.llm.model.layers)
    assert len(enc) == 2 and len(llm) == 2
    assert [id(b) for b in blocks] == [id(b) for b in enc + llm]


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    from aero_lightning.data.synth import build_demo_corpus
    from aero_lightning.model.tiny import corpus_texts

    root = tmp_path_factory.mktemp("fsdp2_e2e")
    corpus = root / "corpus"
    build_demo_corpus(corpus, num_train=24, num_val=4, num_test=4, seed=0, shard_size=8, progress=False)
    build_tiny(root / "model", corpus_texts(corpus))
    return corpus, root / "model"


def test_train_py_with_strategy_fsdp2_saves_sharded_checkpoints_and_resumes(demo_env, tmp_path):
    """`python train.py strategy=fsdp2 trainer.devices=2` on CPU: the strategy file swaps in FSDP2AeroLitModule,
    checkpoints are folders with one shard per rank plus the Lightning state (data-stream positions of both ranks
    included), last.ckpt is a link to the newest step folder (save_last: link), a second run resumes through that
    link, its final step (off the every-2-steps schedule) is saved and linked, and load_model reads the run folder.
    Validation and test decoding are off: see conf/strategy/fsdp2.yaml about evaluation under sharded strategies."""
    corpus, model = demo_env
    out = tmp_path / "run"
    common = [
        "experiment=demo",
        "strategy=fsdp2",
        "trainer.devices=2",
        f"paths.demo_corpus_dir={corpus}",
        f"paths.demo_model_dir={model}",
        f"hydra.run.dir={out}",
        "data.num_workers=0",
        "data.packing.packing_length=400",
        "data.packing.buffer_size=16",
        "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
        "run_test=false",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.throughput.window=1",  # its per-window all-reduce over both ranks runs every step
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("AERO_ROOT", "LOCAL_RANK")
    }
    ckpts = out / "checkpoints"
    last = ckpts / "last.ckpt"
    for steps, resume in ((2, []), (3, [f"ckpt_path={last}"])):
        proc = subprocess.run(
            [sys.executable, "train.py", *common, f"trainer.max_steps={steps}", *resume],
            cwd=ROOT,
            env=env | {"HYDRA_FULL_ERROR": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert last.is_symlink() and os.readlink(last) == f"step{steps:07d}.ckpt"
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000003.ckpt"]
    for step in (2, 3):
        folder = ckpts / f"step{step:07d}.ckpt"
        assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["global_step"] == 3
    assert meta["hyper_parameters"]["lr"] == 2.0e-3
    ranks = meta["AeroDataModule"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["consumed"] == 1 for r in ranks)  # since the resume
    weights, step = sharded_model_weights(ckpts / "step0000003.ckpt")
    assert step == 3
    state = load_model(out, device="cpu").state_dict()  # train.py's config.yaml, the linked step-3 shards
    assert state.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
