"""Multi-GPU and multi-node training: DeepSpeed ZeRO 1/2/3, FSDP2 and the SLURM cluster environment.

Lightning is the engine; this module only adds what the project needs on top of it:

- :class:`AeroDeepSpeedStrategy`: Lightning's ``DeepSpeedStrategy`` built from :func:`deepspeed_config` (ZeRO stage,
  optional CPU offload; bf16 comes from ``trainer.precision``), with gradient accumulation scaled once. Lightning's
  automatic optimisation already divides the ``training_step`` loss by ``accumulate_grad_batches``
  (``ClosureResult.from_training_step_output``), and ``DeepSpeedEngine.backward`` divides it again by
  ``gradient_accumulation_steps`` (``scale_wrt_gas=True``), which Lightning sets to the same number, so the
  stock strategy trains with the gradient divided by ``accumulate_grad_batches ** 2``. This strategy calls
  ``backward(..., scale_wrt_gas=False)``.
- :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` as pure data-parallel FSDP2 (tensor parallel size 1),
  with :func:`apply_fsdp2` (``fully_shard`` on every transformer block of encoder and LLM, then the root) as the
  sharding plan. The LightningModule applies it in ``configure_model`` (:class:`FSDP2Mixin`).
- :func:`slurm_environment`: Lightning's ``SLURMEnvironment`` (ranks and world size from ``srun``) with Lightning's
  own requeue handling off, when the process runs under ``srun`` and not under ``torchrun``; None otherwise.
  Preemption is handled by :class:`aero_lightning.callbacks.preemption.PreemptionCheckpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from aero_lightning.lit_module import AeroLitModule

logger = logging.getLogger(__name__)

ZERO_STAGES = (1, 2, 3)


# ---------------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_config(
    stage: int,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    pin_memory: bool = True,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    reduce_bucket_size: int = 200_000_000,
    allgather_bucket_size: int = 200_000_000,
) -> dict[str, Any]:
    """The DeepSpeed config dict of a ZeRO stage (https://www.deepspeed.ai/docs/config-json/).

    Lightning completes it at ``Trainer.fit``: ``bf16: {enabled: true}`` from ``trainer.precision`` (``bf16-mixed``
    or ``bf16-true``), ``gradient_accumulation_steps`` from ``trainer.accumulate_grad_batches`` and
    ``gradient_clipping`` from ``trainer.gradient_clip_val``.

    Args:
        stage: ZeRO stage: 1 partitions the optimizer states, 2 also the gradients, 3 also the parameters
            (Rajbhandari et al. 2020, "ZeRO", arXiv:1910.02054).
        offload_optimizer: keep optimizer states (and the optimizer step) in CPU memory (ZeRO-Offload).
        offload_parameters: keep parameters in CPU memory (ZeRO-Infinity); needs stage 3.
        pin_memory: page-locked CPU buffers for the offloaded tensors (faster transfers, more host memory).
        overlap_comm: overlap gradient reduction with the backward pass.
        contiguous_gradients: copy gradients into one contiguous buffer as they are produced.
        reduce_bucket_size: elements reduced at once.
        allgather_bucket_size: elements all-gathered at once (stages 1 and 2).

    Returns:
        The config dict. ``train_micro_batch_size_per_gpu`` is 1: DeepSpeed uses it only for throughput logging, and
        a micro-batch here is a token budget, not a sample count. ``zero_allow_untested_optimizer`` lets the module's
        ``torch.optim.AdamW`` through; with ``offload_optimizer`` the optimizer step of that AdamW runs on the CPU
        (``zero_force_ds_cpu_optimizer: false``), which is correct but slower than DeepSpeed's fused CPU Adam.

    Raises:
        ValueError: for a stage other than 1, 2, 3, or parameter offload below stage 3.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    if offload_parameters and stage != 3:
        raise ValueError(f"offload_parameters needs ZeRO stage 3, got stage {stage}")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": contiguous_gradients,
        "reduce_scatter": True,
        "reduce_bucket_size": int(reduce_bucket_size),
    }
    if stage < 3:
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = int(allgather_bucket_size)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 1,
    }
    if offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


class AeroDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` configured by :func:`deepspeed_config`, accumulation scaled once.

    Needs the ``deepspeed`` package (extra ``gpu`` or ``deepspeed``) and CUDA GPUs; bf16 is set with
    ``trainer.precision: bf16-mixed``.

    Args:
        stage, offload_optimizer, offload_parameters, pin_memory, overlap_comm, contiguous_gradients,
            reduce_bucket_size, allgather_bucket_size: see :func:`deepspeed_config`.
        config_overrides: entries merged into the generated config (nested dicts are merged key by key), e.g.
            ``{"zero_optimization": {"stage3_prefetch_bucket_size": 50000000}}``.
        **kwargs: passed to Lightning's ``DeepSpeedStrategy`` (``logging_level``, ``process_group_backend``,
            ``timeout``, ``exclude_frozen_parameters``, ...); ``config`` is not accepted (built here).

    Raises:
        lightning.pytorch.utilities.exceptions.MisconfigurationException: when ``deepspeed`` is not installed.
        ValueError: see :func:`deepspeed_config`.
    """

    def __init__(
        self,
        stage: int = 2,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        pin_memory: bool = True,
        overlap_comm: bool = True,
        contiguous_gradients: bool = True,
        reduce_bucket_size: int = 200_000_000,
        allgather_bucket_size: int = 200_000_000,
        config_overrides: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if "config" in kwargs:
            raise TypeError("AeroDeepSpeedStrategy builds its own DeepSpeed config; use config_overrides")
        config = deepspeed_config(
            stage,
            offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters,
            pin_memory=pin_memory,
            overlap_comm=overlap_comm,
            contiguous_gradients=contiguous_gradients,
            reduce_bucket_size=reduce_bucket_size,
            allgather_bucket_size=allgather_bucket_size,
        )
        _merge(config, dict(config_overrides or {}))
        super().__init__(config=config, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Backward through the DeepSpeed engine without its second division by the accumulation steps.

        Lightning has already divided the loss by ``accumulate_grad_batches``; ``DeepSpeedEngine.backward`` would
        divide it again (``scale_wrt_gas=True``), so ``scale_wrt_gas=False`` here.
        """
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)


def _merge(base: dict, extra: Mapping) -> None:
    """Recursive in-place dict update (``extra`` wins)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value


# ---------------------------------------------------------------------------------------------------- FSDP2
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of a model: the children of each ``nn.ModuleList`` named ``layers``.

    For an :class:`~aero_lightning.model.aero.AeroModel` these are the encoder layers
    (``encoder.encoder.layers.<i>``) and the LLM decoder layers (``llm.model.layers.<i>``), in that order.

    Args:
        model: any module.

    Returns:
        The blocks, in ``named_modules`` order.
    """
    blocks: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            blocks.extend(module)
    return blocks


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).removeprefix("torch."))


def apply_fsdp2(
    model: nn.Module,
    mesh,
    reshard_after_forward: bool = True,
    param_dtype: str | torch.dtype | None = None,
    reduce_dtype: str | torch.dtype | None = None,
    cpu_offload: bool = False,
    forward_methods: tuple[str, ...] = ("generate",),
) -> nn.Module:
    """Shard a model with FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per transformer block, then the root.

    Each block (:func:`transformer_blocks`) is its own all-gather / reduce-scatter unit, so only one block's full
    parameters live on a device at a time during forward and backward; the root unit holds what is left (conv stem,
    positional table, projector, token embedding, final norms, LM head). Frozen parameters are sharded the same way
    and get no gradient. Idempotent: an already sharded model is returned as is (Lightning calls
    ``configure_model`` again for ``trainer.test`` after ``trainer.fit``).

    Args:
        model: the module to shard in place (an ``AeroModel``).
        mesh: the 1-D data-parallel ``DeviceMesh`` (``ModelParallelStrategy.device_mesh["data_parallel"]``).
        reshard_after_forward: free the gathered parameters of a block after its forward (ZeRO-3-like memory) or keep
            them until the backward (ZeRO-2-like, one all-gather fewer per block).
        param_dtype: dtype of the gathered parameters used in compute (e.g. ``"bfloat16"``; floating inputs of every
            unit are cast to it); None keeps the stored dtype and leaves mixed precision to ``trainer.precision``
            (autocast with ``bf16-mixed``).
        reduce_dtype: dtype of the gradient reduce-scatter (None: ``param_dtype``).
        cpu_offload: keep sharded parameters, gradients and the optimizer step on the CPU.
        forward_methods: model methods other than ``forward`` that run the model and so must gather the root's
            parameters first (``torch.distributed.fsdp.register_fsdp_forward_method``); ``generate`` for test
            decoding.

    Returns:
        ``model``, now an ``FSDPModule``.

    Raises:
        ValueError: if the model has no ``layers`` block list to shard.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if isinstance(model, FSDPModule):
        return model
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList named 'layers': nothing to shard per block"
        )
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype)),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for method in forward_methods:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    logger.info("FSDP2: %d transformer blocks + root sharded over %d ranks", len(blocks), mesh.size())
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure data-parallel FSDP2 over every process.

    The device mesh is ``(data_parallel = world size, tensor_parallel = 1)``; the LightningModule's
    ``configure_model`` shards its model with :meth:`parallelize` (:class:`FSDP2Mixin`). Checkpoints are distributed
    (a folder with one shard per rank) unless ``save_distributed_checkpoint=False``.

    Args:
        reshard_after_forward, param_dtype, reduce_dtype, cpu_offload: see :func:`apply_fsdp2`.
        save_distributed_checkpoint: one file per rank (fast, resumable with the same world size) or one full file
            assembled on rank 0.
        process_group_backend: None picks NCCL on CUDA, gloo on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.fsdp_kwargs = {
            "reshard_after_forward": reshard_after_forward,
            "param_dtype": param_dtype,
            "reduce_dtype": reduce_dtype,
            "cpu_offload": cpu_offload,
        }

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process is a data-parallel rank
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` over the data-parallel mesh (:func:`apply_fsdp2`)."""
        return apply_fsdp2(model, self.device_mesh["data_parallel"], **self.fsdp_kwargs)


class FSDP2Mixin:
    """``configure_model`` for a LightningModule whose ``self.model`` is sharded under :class:`FSDP2Strategy`.

    A no-op under any other strategy (DDP, DeepSpeed, single device), so it can be mixed into the module for good.
    """

    def configure_model(self) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy):
            strategy.parallelize(self.model)


class FSDP2AeroLitModule(FSDP2Mixin, AeroLitModule):
    """:class:`~aero_lightning.lit_module.AeroLitModule` with the FSDP2 ``configure_model`` hook
    (``conf/strategy/fsdp2.yaml`` selects it)."""


# ---------------------------------------------------------------------------------------------------- SLURM
def slurm_environment() -> SLURMEnvironment | None:
    """Lightning's SLURM cluster environment when this process was started by ``srun``, else None.

    Under SLURM (``SLURM_NTASKS`` set, job name not ``bash``/``interactive``: ``SLURMEnvironment.detect()``), ranks,
    world size and the main address come from the SLURM variables. Lightning's own requeue handling is off
    (``auto_requeue=False``): it would save the checkpoint inside the SIGUSR1 handler, wherever each rank is in its
    step (:mod:`aero_lightning.callbacks.preemption`, which saves at a step boundary instead).

    None when ``torchrun`` started the processes, even inside a SLURM allocation (``TORCHELASTIC_RUN_ID`` set:
    ``TorchElasticEnvironment.detect()``): one ``srun`` task then runs ``torchrun``, which starts one process per
    GPU, and the SLURM variables describe the ``srun`` task, not these processes (``SLURM_PROCID`` is the node's
    task, not the rank). Lightning then picks ``TorchElasticEnvironment`` itself, which it ranks above SLURM for
    the same reason (``_AcceleratorConnector._choose_and_init_cluster_environment``).

    Returns:
        A ``SLURMEnvironment`` (for ``Trainer(plugins=[...])``) or None.
    """
    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return None
    return SLURMEnvironment(auto_requeue=False)
