"""Process group set-up and `parallelize`: the steps that turn a plain model into the one a rank trains.

Order (as torchtitan): tensor parallel (not in this version), activation checkpointing, compile, then data-parallel
wrapping by the engine. Each step is a small function with plain arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from trainer.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism for this run: world = dp * tp."""

    world_size: int
    rank: int
    local_rank: int
    dp: int
    tp: int = 1

    def __post_init__(self) -> None:
        if self.dp * self.tp != self.world_size:
            raise UserError(
                f"dp={self.dp} x tp={self.tp} does not equal the world size {self.world_size}: "
                f"set parallel.tp to a divisor of {self.world_size}"
            )

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(tp: int = 1) -> tuple[ParallelDims, torch.device]:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, joins the process group (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    if world % tp:
        raise UserError(f"parallel.tp={tp} does not divide the world size {world}")
    return ParallelDims(world_size=world, rank=rank, local_rank=local_rank, dp=world // tp, tp=tp), device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute block activations in backward: `full` wraps every block, `selective` every other block."""
    if mode == "none":
        return
    every = 1 if mode == "full" else 2
    blocks = model.blocks
    for i in range(len(blocks)):
        if i % every == 0:
            blocks[i] = checkpoint_wrapper(blocks[i])


def apply_compile(model: nn.Module) -> None:
    """Compiles each block in place (parameter names unchanged); repeated blocks reuse one compiled graph."""
    for block in model.blocks:
        block.compile()


def parallelize(model: nn.Module, activation_checkpointing: str, compile: bool) -> nn.Module:
    """Applies the per-model steps in place; data-parallel wrapping is the engine's job."""
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
