"""Engines own everything data-parallel behind one interface (`Engine`, see base.py): wrapping or sharding the model,
building the optimizer on the parameters they hold, precision, a whole training step (every micro-batch of it, with
gradient sync on the last) and an evaluation step, the gradient reduction, clipping, and saving/loading their state.
A new engine is a sibling of these: the loop sees only the interface.

- `ddp`: DistributedDataParallel (ZeRO stage 0).
- `fsdp`: FSDP2 `fully_shard` on the dp mesh axis (ZeRO-2 or ZeRO-3), composable with tensor parallelism.
- `deepspeed`: DeepSpeed ZeRO-1/2/3 with optional CPU offload (imported only when chosen: it is an optional extra).
- pipeline (parallel.pp > 1): stages on the pp mesh axis run by a torch.distributed.pipelining schedule, each stage
  tensor-parallel and FSDP-sharded as above (engines/pipeline.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from trainer.engines.base import Engine
from trainer.engines.ddp import DDPEngine
from trainer.engines.fsdp import FSDPEngine
from trainer.errors import UserError
from trainer.optim import OptimizerSettings
from trainer.parallel import ParallelDims

__all__ = ["DDPEngine", "Engine", "FSDPEngine", "build_engine", "check_payload"]


def check_payload(checkpoint: Path, engine: str, zero_stage: int) -> None:
    """Refuses, in one line, a checkpoint whose payload `engine` cannot read: DeepSpeed's own checkpoints are read
    by the deepspeed engine only (at any world size, ZeRO-1 and 2 interchangeably, offload on or off, through its
    universal checkpoint), DCP checkpoints by ddp and fsdp (any layout)."""
    from trainer.engines.deepspeed import LAYOUT_FILE, PAYLOAD_DIR

    if (checkpoint / PAYLOAD_DIR).is_dir():
        saved = json.loads((checkpoint / PAYLOAD_DIR / LAYOUT_FILE).read_text())
        if engine != "deepspeed":
            raise UserError(
                f"checkpoint {checkpoint} was written by parallel.engine=deepspeed (ZeRO-{saved['zero_stage']}): "
                f"resume it with parallel.engine=deepspeed, or start a fresh run (checkpoint.resume=never or another "
                f"run.dir)"
            )
        if (saved["zero_stage"] == 3) != (zero_stage == 3):
            raise UserError(
                f"checkpoint {checkpoint} was written by DeepSpeed ZeRO-{saved['zero_stage']}, which DeepSpeed "
                f"cannot load into ZeRO-{zero_stage}: resume with parallel.zero_stage="
                f"{'3' if saved['zero_stage'] == 3 else '1 or 2'} (any world size, offload on or off)"
            )
    elif engine == "deepspeed":
        raise UserError(
            f"checkpoint {checkpoint} was written by parallel.engine=ddp or fsdp (DCP): resume it with one of "
            f"those (any layout), or start a fresh run (checkpoint.resume=never or another run.dir)"
        )


def build_engine(
    name: str,
    make_model: Callable[[], nn.Module],
    prepare: Callable[[nn.Module], nn.Module],
    *,
    dims: ParallelDims,
    device: torch.device,
    precision: str,
    grad_clip: float,
    optim: OptimizerSettings,
    seed: int,
    zero_stage: int,
    offload: str = "none",
    deepspeed: dict | None = None,
    load: Callable[[nn.Module], None] | None = None,
    pipeline=None,
    micro_batches: int = 1,
) -> Engine:
    """The engine `name` around the model `make_model` builds and `prepare` parallelizes (tensor parallel, activation
    checkpointing, compile; data parallelism is the engine's). The model is built on the meta device (for DeepSpeed
    ZeRO-3 inside `deepspeed.zero.Init`, which partitions it as it is built); the engine materialises its weights
    from `seed` (then `load(model)` when given: a pretrained checkpoint) and builds the optimizer on them. `deepspeed` is
    the generated DeepSpeed config. `pipeline` (a PipelinePlan, pp > 1) splits the model into stages run by a
    schedule over `micro_batches` per step, `name` then saying what shards each stage over dp."""
    common = {
        "dims": dims,
        "device": device,
        "precision": precision,
        "grad_clip": grad_clip,
        "optim": optim,
        "seed": seed,
        "load": load,
    }
    if pipeline is not None:
        from trainer.engines.pipeline import PipelineEngine

        return PipelineEngine(
            make_model,
            prepare,
            plan=pipeline,
            data_parallel=name,
            micro_batches=micro_batches,
            zero_stage=zero_stage,
            **common,
        )
    if name == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine

        del common["grad_clip"]  # part of the DeepSpeed config
        return DeepSpeedEngine(make_model, prepare, config=deepspeed, zero_stage=zero_stage, offload=offload, **common)
    with torch.device("meta"):
        model = prepare(make_model())
    if name == "ddp":
        return DDPEngine(model, **common)
    if name == "fsdp":
        return FSDPEngine(model, zero_stage=zero_stage, **common)
    raise ValueError(f"unknown engine {name}")
