"""Small helpers for code that runs on every rank: is this strategy sharding parameters, and gathering objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["gather_objects", "parameters_are_sharded", "rank_and_world"]


def parameters_are_sharded(strategy) -> bool:
    """True for strategies that shard parameters (FSDP, DeepSpeed ZeRO-3): every forward all-gathers them, so all
    ranks must run the same number of forward passes (equal evaluation batches, ``synced_gpus`` generation)."""
    if "fsdp" in type(strategy).__name__.lower():
        return True
    stage = getattr(strategy, "zero_stage_3", None)
    if stage is None:
        config = getattr(strategy, "config", None) or {}
        stage = (
            (config.get("zero_optimization") or {}).get("stage") == 3
            if isinstance(config, Mapping)
            else False
        )
    return bool(stage)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``all_gather_object``); ``[obj]`` without a process group.

    A collective: every rank must call it.
    """
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
