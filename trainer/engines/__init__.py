"""Engines own everything data-parallel behind one interface (`Engine`, see base.py): wrapping or sharding the model,
building the optimizer on the parameters they hold, precision, the micro-batch context, the gradient reduction,
clipping, and saving/loading their state.

- `ddp`: DistributedDataParallel (ZeRO stage 0).
- `fsdp`: FSDP2 `fully_shard` on the dp mesh axis (ZeRO-2 or ZeRO-3), composable with tensor parallelism.
DeepSpeed slots in beside them with the same interface.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.engines.base import Engine
from trainer.engines.ddp import DDPEngine
from trainer.engines.fsdp import FSDPEngine
from trainer.optim import OptimizerSettings
from trainer.parallel import ParallelDims

__all__ = ["DDPEngine", "Engine", "FSDPEngine", "build_engine"]


def build_engine(
    name: str,
    model: nn.Module,
    *,
    dims: ParallelDims,
    device: torch.device,
    precision: str,
    grad_clip: float,
    optim: OptimizerSettings,
    seed: int,
    zero_stage: int,
) -> Engine:
    """The engine `name` around `model` (built on the meta device and already parallelized); it materialises the
    model's weights from `seed` and builds the optimizer on them."""
    common = {
        "dims": dims,
        "device": device,
        "precision": precision,
        "grad_clip": grad_clip,
        "optim": optim,
        "seed": seed,
    }
    if name == "ddp":
        return DDPEngine(model, **common)
    if name == "fsdp":
        return FSDPEngine(model, zero_stage=zero_stage, **common)
    raise ValueError(f"unknown engine {name}")
