"""The process grid: `ParallelDims` (degrees, this rank's coordinates, the device mesh) and collectives that name the
mesh axis they reduce over.

Ranks are laid out as `arange(world).view(pp, dp, cp, tp)`: tensor-parallel peers are neighbouring ranks (the same
node, where the fast links are), context-parallel peers (other tokens of the same samples) `tp` apart, data-parallel
peers `cp * tp` apart and pipeline stages `dp * cp * tp` apart (across nodes: a stage boundary sends one activation
per micro-batch). Every reduction says which axis it spans:

- `dp`: sums over data-parallel ranks (target-token counts of whole batches): each dp rank sees other samples, while
  its tp and cp peers see the same samples and would count them again, and so would its pipeline peers.
- `dp_cp`: the data- and context-parallel ranks together, which hold the same parameters and see other tokens (what
  gradients and eval totals are summed over, and what fsdp shards over); the `dp` axis itself when cp = 1.
- `pp`: the pipeline stages of one (dp, tp) coordinate (squared gradient norms: each stage holds other layers).
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
    """Degrees of parallelism (world = pp * dp * tp), this rank's place in the grid, and the mesh (None on one
    process without a process group)."""

    world_size: int
    rank: int
    local_rank: int
    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)
    dp_cp_mesh: DeviceMesh | None = field(default=None, compare=False, repr=False)  # flattened (dp, cp); cp > 1

    def __post_init__(self) -> None:
        if self.pp * self.dp * self.cp * self.tp != self.world_size:
            raise UserError(
                f"pp={self.pp} x dp={self.dp} x cp={self.cp} x tp={self.tp} does not equal the world size "
                f"{self.world_size}: set parallel.pp, parallel.cp and parallel.tp so that their product divides "
                f"{self.world_size}"
            )

    @property
    def pp_rank(self) -> int:
        return self.pp_of(self.rank)

    def pp_of(self, rank: int) -> int:
        """The pipeline coordinate of any `rank`."""
        return rank // (self.dp * self.cp * self.tp)

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def replicas(self) -> int:
        """Ranks holding the same parameters of one (pp, tp) coordinate: dp x cp."""
        return self.dp * self.cp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group of `axis` ("pp", "dp", "cp", "dp_cp", "tp" or "world"); None when there is no process
        group."""
        if self.mesh is None:
            return None
        if axis == "world":
            return dist.group.WORLD
        return self.submesh(axis).get_group()

    def submesh(self, axis: str) -> DeviceMesh | None:
        if self.mesh is None:
            return None
        if axis == "dp_cp":
            return self.dp_cp_mesh if self.cp > 1 else self.mesh["dp"]
        return self.mesh[axis]


# set once this process has joined a process group, and its pipeline stage (the CLI words errors by them)
JOINED: dict = {"group": False, "stage": None}


def check_world(world: int, tp: int, pp: int = 1, cp: int = 1) -> int:
    """The data-parallel degree world / (pp * cp * tp), or one line when that product does not divide the world
    size."""
    named = [(k, v) for k, v in (("pp", pp), ("cp", cp), ("tp", tp)) if v > 1 or k == "tp"]
    if world % (tp * pp * cp):
        what = " x ".join(f"parallel.{k}={v}" for k, v in named)
        what = what if len(named) == 1 else f"{what} = {tp * pp * cp}"
        keys = " or ".join(f"parallel.{k}" for k, _ in named)
        raise UserError(
            f"{what} does not divide the world size {world}: launch a multiple of {tp * pp * cp} ranks or lower {keys}"
        )
    return world // (tp * pp * cp)


def init_distributed(
    tp: int = 1, need_group: bool = False, timeout_s: float = 600, pp: int = 1, cp: int = 1
) -> tuple[ParallelDims, torch.device]:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, joins the process group (NCCL on GPUs, gloo on CPU) and builds the
    (pp, dp, cp, tp) mesh. A single process joins a group of one only when `need_group` (FSDP and DTensor need a
    mesh)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp = check_world(world, tp, pp, cp)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"  # CPU tensors (the stop flag, read by the host every step) go through gloo
    else:
        device = torch.device("cpu")
        backend = "gloo"
    mesh = flat = None
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
        mesh = init_device_mesh(device.type, (pp, dp, cp, tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
        flat = mesh["dp", "cp"]._flatten("dp_cp") if cp > 1 else None
    dims = ParallelDims(
        world_size=world, rank=rank, local_rank=local_rank, dp=dp, tp=tp, pp=pp, cp=cp, mesh=mesh, dp_cp_mesh=flat
    )
    JOINED["stage"] = dims.pp_rank if pp > 1 else None
    return dims, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, dims: ParallelDims, axis: str) -> torch.Tensor:
    """In-place SUM of `t` over the ranks of `axis` ("pp", "dp", "dp_cp" or "world"); returns `t`."""
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
