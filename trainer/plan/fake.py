"""`trainer plan --measure`: one training step of a config's layout measured on fake tensors, for models far too large
for the machine that plans them.

`measure_fake(cfg, model_cfg, world, rank)` simulates rank `rank` of `world` in this one process: PyTorch's fake
process group (collectives that move nothing) and `FakeTensorMode` (tensors with shapes, dtypes and storages but no
memory behind them). The engine is built by `trainer.build.build_model`, as `trainer train` builds it (tensor
parallel, activation checkpointing, FSDP2 or DDP, materialised and initialised), then `measure_step`'s warm-up and
measured step run on the config's micro-batches and report the same categories in bytes.

What fake tensors cannot do, and what stands in:
- the engines count target tokens on the host (`int((labels != -100).sum())`) and DDP's reducer writes bucket
  indices into integer tensors: the batches stay real (a few KiB of token ids) and `_RealOnly` runs every op on real
  tensors alone, and every integer or meta-device factory call, for real;
- DTensor works out each op's output shape on tensors of the global shape in the fake mode it finds active (ours,
  where in eager it is one of its own, which the tracker ignores): those runs are marked and left out;
- the fake process group's futures carry no value, which the ddp engine's comm hook reads: the hook is swapped for
  one that reduces in place and returns the bucket, as the real one does;
- storages have no address: `measure.py` tells them apart by identity.
"""

from __future__ import annotations

import contextlib
import gc

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.build import build_model, check_layout
from trainer.config import Config
from trainer.engines import ddp as ddp_engine
from trainer.errors import UserError
from trainer.models import ModelConfig, family
from trainer.parallel import ParallelDims, check_tp_degree
from trainer.parallel.dims import check_world
from trainer.plan.measure import _tracker, measure_step


class _RealOnly(TorchDispatchMode):
    """Runs for real the ops on real tensors alone (the batch's ids and labels, host-side counts, the meta-device model
    before the engine materialises it) and the factory calls of integer tensors (counts, indices) or on the meta
    device; the rest (any fake input, a meta tensor copied to another device, floating-point factory calls) falls
    through to the fake mode. A real meta model lets `to_empty` put fake parameters in place of meta ones: swapping
    a fake tensor into a fake meta parameter fails (FakeTensorMode holds weak references to it)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t is not torch.Tensor and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented  # DTensor: let it unwrap into local ops, which come back here
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        asked = kwargs.get("device")
        if tensors:
            real = all(type(t) is torch.Tensor and (asked is None or t.device == asked) for t in tensors)
        else:
            dtype = kwargs.get("dtype")
            on_meta = asked is not None and torch.device(asked).type == "meta"
            real = on_meta or (dtype is not None and not dtype.is_floating_point and not dtype.is_complex)
        if real:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


_PROPAGATING = [0]  # > 0 while DTensor works out an op's output shape


def _fake_pg_hook(group, bucket):  # no annotations: DDP checks them
    """The ddp engine's comm hook (a SUM all-reduce of the bucket, which it returns) on a process group whose
    futures carry no value."""
    dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group)
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


@contextlib.contextmanager
def _simulated():
    """Marks DTensor's shape propagation (for `_fake_tracker`) and swaps the ddp engine's comm hook, until exit."""
    original = ShardingPropagator._propagate_tensor_meta_non_cached
    hook = ddp_engine._allreduce_sum_hook

    def marked(self, op_schema):
        _PROPAGATING[0] += 1
        try:
            return original(self, op_schema)
        finally:
            _PROPAGATING[0] -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = marked
    ddp_engine._allreduce_sum_hook = _fake_pg_hook
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original
        ddp_engine._allreduce_sum_hook = hook


def _fake_tracker():
    """measure's tracker, blind to DTensor's shape propagation (tensors of the global shape, never allocated)."""

    class FakeStepTracker(type(_tracker())):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _PROPAGATING[0]:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return FakeStepTracker()


def _batches(cfg: Config, model_cfg: ModelConfig) -> list[dict]:
    """The step's micro-batches of random token ids, real tensors (see the module docstring); a masked LM predicts a
    sixth of the positions, as bench/plan_accuracy.py's batches."""
    t, seq = cfg.train, cfg.data.seq_len
    gen = torch.Generator().manual_seed(1000)
    out = []
    for _ in range(t.grad_accum):
        ids = torch.randint(4, model_cfg.vocab_size, (t.micro_batch, seq + 1), generator=gen)
        labels = ids[:, 1:].clone()
        if family(model_cfg.arch).objective == "masked":
            labels[torch.rand(labels.shape, generator=gen) > 0.15] = -100
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": labels})
    return out


def measure_fake(cfg: Config, model_cfg: ModelConfig, world: int, rank: int = 0) -> dict:
    """Bytes per category (parameters, gradients, optimizer, activations, peak: as `measure_step`; and peak_where)
    that rank `rank` of `world` holds in one training step of `cfg`'s layout (fsdp or ddp, any tp, no pipeline),
    simulated on fake tensors in this process on the CPU device type. The fake process group is destroyed on return:
    it can be called again, for another layout or world size."""
    p = cfg.parallel
    if p.engine not in ("fsdp", "ddp") or p.pp > 1 or p.cp > 1:
        raise UserError(
            f"--measure covers fsdp and ddp layouts without pipeline stages or context parallelism (here "
            f"parallel.engine={p.engine}, parallel.pp={p.pp}, parallel.cp={p.cp}): use the formula's figures for the "
            f"others"
        )
    if dist.is_initialized():
        raise UserError("--measure simulates ranks in a process without a process group: run it outside a job")
    check_tp_degree(p.tp, model_cfg.tp_divisors(), cfg.data.seq_len)
    dp = check_world(world, p.tp)
    batches = _batches(cfg, model_cfg)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (1, dp, p.tp), mesh_dim_names=("pp", "dp", "tp"))
        dims = ParallelDims(world_size=world, rank=rank, local_rank=rank, dp=dp, tp=p.tp, mesh=mesh)
        check_layout(cfg, dims, model_cfg)
        # the caller's RNG is left as it was (materialize seeds the global one)
        with torch.random.fork_rng(devices=[]), FakeTensorMode(allow_non_fake_inputs=True), _RealOnly(), _simulated():
            engine, _ = build_model(cfg, dims, torch.device("cpu"), model_cfg)
            figures = measure_step(engine, batches, tracker=_fake_tracker())
        del engine
        gc.collect()
        return figures
    finally:
        dist.destroy_process_group()
