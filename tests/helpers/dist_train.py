"""Script for tests/test_strategies.py: a few optimizer steps of the tiny model under a distributed strategy on CPU.

``python tests/helpers/dist_train.py TINY_DIR OUT.pt STRATEGY WORLD MICRO ACCUM STEPS LR [PRECISION [RUN_DIR]]``:
the 4 documents of :func:`ddp_grads.documents` are split over ``WORLD`` processes (gloo), each rank training ``MICRO``
documents per micro-batch with ``ACCUM`` accumulation steps; the same global batch is trained ``STEPS`` times with
AdamW at ``LR``.
``STRATEGY`` is ``auto`` (one process), ``ddp``, ``fsdp2`` (:class:`~aero_lightning.strategies.FSDP2Strategy`),
``deepspeed`` (:class:`~aero_lightning.strategies.AeroDeepSpeedStrategy`, ZeRO-2), ``deepspeed_zero3`` (the same at
stage 3, every parameter partitioned) or ``deepspeed_stock`` (Lightning's own ``DeepSpeedStrategy``, ZeRO-2). The
DeepSpeed strategies need CUDA; here they run on DeepSpeed's CPU accelerator with the CUDA check skipped and without
its shared-memory allreduce kernel (a C++ build, :func:`skip_shm_op_build`). Rank 0 writes
``{"grads": first step's full gradients, "losses": global-batch loss per step, "sharded": {name: parameter is a
DTensor or ZeRO-3 partition}, "params": flops.count_params of the model as the strategy holds it (as a dict),
"local_numel": parameter elements held by rank 0 at the start of training, "generated": greedy ids of 4 new tokens
for documents 0-1 after training, "trained": the trainable parameters' full values after training}``. With
``RUN_DIR`` the trained model is saved there as a run folder (:func:`save_run`). The environment variable
``DIST_TRAIN_MODEL`` (JSON) adds keyword arguments of ``build_aero_model``, e.g. ``{"lora": {...}, "freeze": [...]}``.
Lightning's launcher re-executes this file once per extra rank (``LOCAL_RANK`` set).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.parallel import ParallelStrategy
from omegaconf import OmegaConf

from aero_lightning.data.datamodule import AccumulationGroups, AsrCollator  # noqa: E402
from aero_lightning.data.packing import collate_packed  # noqa: E402
from aero_lightning.model.flops import count_params  # noqa: E402
from aero_lightning.strategies import AeroDeepSpeedStrategy, FSDP2AeroLitModule, FSDP2Strategy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script, one process per rank
from helpers.ddp_grads import build_model, documents  # noqa: E402


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of a DTensor, else the tensor (empty for ZeRO-3 outside a
    forward)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Capture(L.Callback):
    """Full gradients before the first optimizer step; the global-batch loss of every step.

    The module returns ``loss_sum * world * accum / global_tokens`` per micro-batch and Lightning hands
    ``returned / accum`` to ``on_train_batch_end``; summed over a step's micro-batches and ranks and divided by the
    world size, that is ``sum of token losses / global target tokens``, the loss of the global batch.
    """

    def __init__(self, accum: int):
        self.accum = accum
        self.grads: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []
        self._step_sum = 0.0
        self._micro = 0
        self.sharded: dict[str, bool] = {}
        self.params: dict = {}
        self.local_numel = 0

    def result(self) -> dict:
        """What rank 0 writes (module docstring)."""
        keys = ("grads", "losses", "sharded", "params", "local_numel", "trained", "generated")
        return {k: getattr(self, k) for k in keys}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads or self._micro + 1 < self.accum:
            return  # DeepSpeed calls this hook on every micro-batch: keep the accumulation boundary only
        engine = trainer.strategy.model if isinstance(trainer.strategy, DeepSpeedStrategy) else None
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            if engine is not None:
                from deepspeed.utils import safe_get_full_grad

                grad = safe_get_full_grad(p)
            else:
                grad = None if p.grad is None else _full(p.grad)
            if grad is not None:
                self.grads[name] = grad.detach().float().clone()
        # FSDP2 parameters are DTensors, ZeRO-3 ones carry DeepSpeed's ds_id
        self.sharded = {
            n: hasattr(p, "full_tensor") or hasattr(p, "ds_id") for n, p in pl_module.named_parameters()
        }

    def on_train_start(self, trainer, pl_module):
        # FLOP-counting view of the model as the strategy holds it (partitioned under ZeRO-3 and FSDP2)
        self.params = dataclasses.asdict(count_params(pl_module.model))
        self.local_numel = sum(_local(p).numel() for p in pl_module.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._step_sum += float(outputs["loss"])
        self._micro += 1
        if self._micro == self.accum:
            total = torch.tensor(self._step_sum, dtype=torch.float64)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(total)
            self.losses.append(float(total) / trainer.world_size)
            self._step_sum, self._micro = 0.0, 0


class _CPUDeepSpeedMixin:
    """Run a DeepSpeed strategy on DeepSpeed's CPU accelerator (tests only)."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed needs a device index; "cpu:N" is the CPU

    def setup_environment(self) -> None:
        ParallelStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class CPUAeroDeepSpeed(_CPUDeepSpeedMixin, AeroDeepSpeedStrategy):
    pass


class CPUStockDeepSpeed(_CPUDeepSpeedMixin, DeepSpeedStrategy):
    pass


def skip_shm_op_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory allreduce kernel (``deepspeed_shm_comm``).

    ``TorchBackend.__init__`` in ``deepspeed/comm/torch.py`` calls that module's ``build_shm_op()``, which on the CPU
    accelerator compiles the kernel with ninja (one to several minutes on a small CPU; an interrupted build leaves a
    lock in ``TORCH_EXTENSIONS_DIR`` that hangs later runs). When ``build_shm_op`` returns None, DeepSpeed all-reduces
    through ``torch.distributed`` (gloo), which is all a CPU test needs. The module must be taken from
    ``sys.modules``: the attribute ``deepspeed.comm.torch`` is the ``torch`` package (``deepspeed/comm/comm.py`` does
    ``import torch`` and has no ``__all__``, and ``deepspeed/comm/__init__.py``'s ``from .comm import *`` rebinds the
    package attribute ``torch`` to it after the submodule was imported), so ``deepspeed.comm.torch.build_shm_op =
    ...`` would patch PyTorch and leave DeepSpeed's function in place.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    assert hasattr(module, "TorchBackend"), module  # DeepSpeed's backend module, not the torch package
    module.build_shm_op = lambda: None


def make_strategy(name: str):
    if name in ("auto", "ddp"):
        return name
    if name == "fsdp2":
        return FSDP2Strategy()
    skip_shm_op_build()
    if name == "deepspeed":
        return CPUAeroDeepSpeed(stage=2, process_group_backend="gloo")
    if name == "deepspeed_zero3":
        # threshold 0: every parameter is partitioned; DeepSpeed's default (1e5 elements) would keep most of the
        # tiny model's weights whole and leave the partitioned code paths untested
        return CPUAeroDeepSpeed(
            stage=3,
            process_group_backend="gloo",
            config_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        )
    if name == "deepspeed_stock":
        return CPUStockDeepSpeed(
            stage=2,
            process_group_backend="gloo",
            logging_batch_size_per_gpu=1,
            zero_allow_untested_optimizer=True,
        )
    raise ValueError(name)


def run(
    tiny_dir: Path,
    strategy: str,
    world: int,
    micro: int,
    accum: int,
    steps: int,
    lr: float,
    rank: int = 0,
    precision: str = "32-true",
    run_dir: Path | None = None,
    model_kwargs: dict | None = None,
):
    """Train ``steps`` optimizer steps; returns this rank's :class:`Capture`. With ``run_dir``, the trained model
    is also saved there (:func:`save_run`). ``model_kwargs``: extra ``build_aero_model`` arguments (default: the
    ``DIST_TRAIN_MODEL`` environment variable)."""
    if model_kwargs is None:
        model_kwargs = json.loads(os.environ.get("DIST_TRAIN_MODEL", "{}"))
    model = build_model(tiny_dir, **model_kwargs)
    docs = documents(model)
    mine = docs[rank * len(docs) // world : (rank + 1) * len(docs) // world]
    batches = [
        collate_packed(mine[i : i + micro], model.audio_token_counter()) for i in range(0, len(mine), micro)
    ]
    assert len(batches) == accum, (len(batches), accum)
    capture = Capture(accum)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=make_strategy(strategy),
        max_steps=steps,
        precision=precision,
        accumulate_grad_batches=accum,
        gradient_clip_val=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture],
        use_distributed_sampler=False,
    )
    loader = AccumulationGroups([dict(b) for _ in range(steps) for b in batches], accum)
    module = FSDP2AeroLitModule(model, lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
    trainer.fit(module, train_dataloaders=loader)
    if run_dir is not None:
        save_run(trainer, module, tiny_dir, run_dir)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    capture.trained = {k: v for k, v in full_state_dict(trainer, module).items() if k in trainable}
    capture.generated = generate(module.model, docs[:2] if rank == 0 else docs[2:])
    return capture


def full_state_dict(trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The whole weights of ``module.model`` as it is after training, on CPU, named as in
    ``AeroModel.state_dict()`` (a collective: every rank calls it; rank 0's result is the one to keep).

    ZeRO-3 parameters are gathered from their partitions (``GatheredParameters``), FSDP2 DTensors through
    ``get_model_state_dict(full_state_dict=True)``; other strategies hold whole parameters.
    """
    model = module.model
    if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if isinstance(trainer.strategy, FSDP2Strategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_run(trainer: L.Trainer, module: L.LightningModule, tiny_dir: Path, run_dir: Path) -> None:
    """A run folder as train.py leaves it, for load_model: ``checkpoints/last.ckpt`` saved by the strategy (a
    folder for ZeRO and FSDP2), ``config.yaml`` with the model section, and ``full_state.pt``, the trained
    weights gathered here to compare with what load_model reads back."""
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    full = full_state_dict(trainer, module)
    if trainer.global_rank == 0:
        model_cfg = {
            "_target_": "aero_lightning.model.build.build_aero_model",
            "encoder": {"name_or_path": str(tiny_dir / "encoder")},
            "llm": {"name_or_path": str(tiny_dir / "llm")},
            "projector": {
                "_target_": "aero_lightning.model.projector.MLPStackProjector",
                "_partial_": True,
                "stack_factor": 4,
                "hidden_dim": 128,
            },
            "attn_implementation": "varlen",
        }  # build_model's model
        OmegaConf.save(OmegaConf.create({"model": model_cfg}), run_dir / "config.yaml")
        torch.save(full, run_dir / "full_state.pt")
    trainer.strategy.barrier()


@torch.no_grad()
def generate(model, docs: list[dict]) -> list[list[int]]:
    """Greedy decoding of exactly 4 new tokens: every rank runs the same number of forward passes (FSDP2 gathers
    parameters in each one)."""
    model.eval()
    batch = AsrCollator(model.tokenizer, model.audio_token_counter(), for_generation=True)(docs)
    feats, lengths = model.compute_features(batch["audio_pcm"], batch["window_lengths"])
    ids = model.generate(
        batch["input_ids"], batch["attention_mask"], feats, lengths, max_new_tokens=4, min_new_tokens=4
    )
    return ids.tolist()


if __name__ == "__main__":
    tiny, out, strategy = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    world, micro, accum, steps = map(int, sys.argv[4:8])
    lr = float(sys.argv[8])
    precision = sys.argv[9] if len(sys.argv) > 9 else "32-true"
    run_dir = Path(sys.argv[10]) if len(sys.argv) > 10 else None
    rank = int(os.environ.get("LOCAL_RANK", 0))
    capture = run(
        tiny, strategy, world, micro, accum, steps, lr, rank=rank, precision=precision, run_dir=run_dir
    )
    if rank == 0:
        torch.save(capture.result(), out)
