"""The process grid: `ParallelDims` (degrees, this rank's coordinates, the device mesh) and collectives that name the
mesh axis they reduce over.

Ranks are laid out as `arange(world).view(dp, tp)`: tensor-parallel peers are neighbouring ranks (the same node, where
the fast links are), data-parallel peers are `tp` apart. Every reduction says which axis it spans:

- `dp`: sums over data-parallel ranks (target-token counts, losses, eval totals): each dp rank sees other samples,
  while its tp peers see the same samples and would count them again.
- `world`: everything (the stop flag: any rank that got a signal stops the whole job).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism (world = dp * tp), this rank's place in the grid, and the mesh (None on one process
    without a process group)."""

    world_size: int
    rank: int
    local_rank: int
    dp: int
    tp: int = 1
    mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)

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
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group of `axis` ("dp", "tp" or "world"); None when there is no process group."""
        if self.mesh is None:
            return None
        if axis == "world":
            return dist.group.WORLD
        return self.mesh.get_group(axis)

    def submesh(self, axis: str) -> DeviceMesh | None:
        return None if self.mesh is None else self.mesh[axis]


JOINED = {"group": False}  # set once this process has joined a process group (the CLI words errors by it)


def init_distributed(
    tp: int = 1, need_group: bool = False, timeout_s: float = 600
) -> tuple[ParallelDims, torch.device]:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, joins the process group (NCCL on GPUs, gloo on CPU) and builds the
    (dp, tp) mesh. A single process joins a group of one only when `need_group` (FSDP and DTensor need a mesh)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world % tp:
        raise UserError(
            f"parallel.tp={tp} does not divide the world size {world}: launch a multiple of {tp} ranks or "
            f"lower parallel.tp"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"  # CPU tensors (the stop flag, read by the host every step) go through gloo
    else:
        device = torch.device("cpu")
        backend = "gloo"
    mesh = None
    if world > 1 or need_group:
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            if world == 1 and "MASTER_ADDR" not in os.environ:  # a group of one needs no rendezvous
                store = dist.HashStore()
                dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
            else:
                device_id = device if device.type == "cuda" else None
                dist.init_process_group(backend=backend, device_id=device_id, timeout=timeout)
            JOINED["group"] = True
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    dims = ParallelDims(world_size=world, rank=rank, local_rank=local_rank, dp=world // tp, tp=tp, mesh=mesh)
    return dims, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, dims: ParallelDims, axis: str) -> torch.Tensor:
    """In-place SUM of `t` over the ranks of `axis` ("dp" or "world"); returns `t`."""
    group = dims.group(axis)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
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
