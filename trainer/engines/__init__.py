"""Engines own everything data-parallel behind one interface (`Engine`, see base.py): wrapping or sharding the model,
building the optimizer on the parameters they hold, precision, the micro-batch context, the gradient reduction,
clipping, and saving/loading their state.

- `ddp`: DistributedDataParallel (ZeRO stage 0).
- `fsdp`: FSDP2 `fully_shard` on the dp mesh axis (ZeRO-2 or ZeRO-3), composable with tensor parallelism.
- `deepspeed`: DeepSpeed ZeRO-1/2/3 with optional CPU offload (imported only when chosen: it is an optional extra).
"""

from __future__ import annotations

from collections.abc import Callable

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
    make_model: Callable[[], nn.Module],
    *,
    dims: ParallelDims,
    device: torch.device,
    precision: str,
    grad_clip: float,
    optim: OptimizerSettings,
    seed: int,
    zero_stage: int,
    offload: str = "none",
    micro_batch: int = 1,
    grad_accum: int = 1,
    deepspeed: dict | None = None,
) -> Engine:
    """The engine `name` around the model `make_model` builds (parallelized, not yet data-parallel). The model is
    built on the meta device (or, for DeepSpeed ZeRO-3, inside `deepspeed.zero.Init`); the engine materialises its
    weights from `seed` and builds the optimizer on them. `micro_batch`, `grad_accum` and `deepspeed` (extra settings)
    feed the generated DeepSpeed config."""
    common = {
        "dims": dims,
        "device": device,
        "precision": precision,
        "grad_clip": grad_clip,
        "optim": optim,
        "seed": seed,
    }
    if name == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(
            make_model,
            zero_stage=zero_stage,
            offload=offload,
            micro_batch=micro_batch,
            grad_accum=grad_accum,
            extra=deepspeed,
            **common,
        )
    with torch.device("meta"):
        model = make_model()
    if name == "ddp":
        return DDPEngine(model, **common)
    if name == "fsdp":
        return FSDPEngine(model, zero_stage=zero_stage, **common)
    raise ValueError(f"unknown engine {name}")
