"""What one training step really holds, per rank, in the categories the planner predicts: the check on its formula.

`measure_step(engine, batches)` runs a warm-up step (optimizer state and the engines' buffers then exist, as in any
step after the first), then one measured step:

- `parameters`: the storages behind the parameters the rank keeps between steps (its shards; DeepSpeed's flat or
  partitioned buffers), after the step;
- `optimizer`: AdamW's moments and, under DeepSpeed, its fp32 master partitions, after the step;
- `gradients`: the storages behind the gradients when backward has ended and the optimizer has not yet run
  (`.grad` of every parameter, or DeepSpeed's gradient partitions and reduce buckets);
- `activations`: the most bytes saved for backward alive at once (every `saved_tensors_hooks` pack counted until
  autograd releases it, each storage once, parameters and parameters gathered by FSDP left out): one micro-batch's
  worth, or under a pipeline schedule the micro-batches in flight on the rank;
- `peak`: the most live tensor bytes during the step, tracked by PyTorch's `MemTracker` (every tensor the engine
  holds registered before the step, then every allocation and free dispatched during it).

Each storage counts once, at its full size (padding included). On CPU there is no separate device: bytes that
DeepSpeed offloads are counted where they are.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (read directly: `to_local()` is an op, slow under a fake mode), or `t`."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _key(s: torch.UntypedStorage) -> int:
    """A storage's identity, its StorageImpl: unique like its address, and also for fake tensors, which have none."""
    return s._cdata


def _storages(tensors: Iterable, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        s = _local(t).untyped_storage()
        if _key(s) in seen or s.nbytes() == 0:
            continue
        seen.add(_key(s))
        total += s.nbytes()
    return total


def reachable_tensors(root: object, limit: int = 200_000) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through attributes, lists, tuples, dicts and modules (an engine's model,
    optimizers and buffers, DeepSpeed's internals included); each object visited once."""
    out, stack, seen = [], [root], set()
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            if obj.grad is not None:
                stack.append(obj.grad)
            for attr in ("ds_tensor",):
                if getattr(obj, attr, None) is not None:
                    stack.append(getattr(obj, attr))
            continue
        if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            stack.append(obj.state)
            stack.append(obj.param_groups)
            stack.append(vars(obj))
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj) or isinstance(obj, nn.Module):
            module = type(obj).__module__ or ""
            if module.startswith(("trainer", "torch", "deepspeed")) and not module.startswith("torch._C"):
                stack.append(vars(obj))
    return out


class SavedBytes:
    """Bytes saved for backward that are alive, and the most at once: a storage counts from its first pack until
    autograd has released every pack of it."""

    def __init__(self, excluded: Callable[[], set[int]]) -> None:
        self.excluded = excluded
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, packs alive]
        self.now = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter):
            return t
        s = _local(t).untyped_storage()
        ptr = _key(s)
        if ptr in self.excluded() or s.nbytes() == 0:
            return t
        entry = self.live.setdefault(ptr, [s.nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Held(t, ptr, self)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held


class _Held:
    __slots__ = ("__weakref__", "t")

    def __init__(self, t: torch.Tensor, ptr: int, meter: SavedBytes) -> None:
        self.t = t
        weakref.finalize(self, meter._release, ptr)


def _param_storages(modules: list[nn.Module]) -> set[int]:
    return {_key(_local(p).untyped_storage()) for m in modules for p in m.parameters()}


def engine_parts(engine) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
    """The modules and optimizers whose tensors are this rank's model state."""
    if engine.name == "deepspeed":
        return [engine.module], [engine.ds.optimizer]
    if hasattr(engine, "parts"):  # a pipeline: this rank's stages
        return list(engine.parts), list(engine.optimizers)
    return [engine.module], [engine.optimizer]


def _grad_tensors(engine, modules: list[nn.Module]) -> list[torch.Tensor]:
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if engine.name == "deepspeed":  # its gradient partitions and reduce buckets are its own
        opt = engine.ds.optimizer
        for name, value in vars(opt).items():
            if ("grad" in name.lower() or "ipg" in name.lower()) and "norm" not in name.lower():
                grads.extend(t for t in reachable_tensors(value) if t.is_floating_point())
    return grads


def _param_tensors(engine, modules: list[nn.Module]) -> list[torch.Tensor]:
    params = []
    for m in modules:
        for p in m.parameters():
            params.append(getattr(p, "ds_tensor", None))
            params.append(p.data if engine.name == "deepspeed" else p)
    return params


def _optimizer_tensors(engine, optimizers: list) -> list[torch.Tensor]:
    out = []
    for opt in optimizers:
        base = opt.optimizer if engine.name == "deepspeed" else opt
        out.extend(t for st in base.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim())
        if engine.name == "deepspeed":  # fp32 master partitions: what the wrapped optimizer steps
            out.extend(p for g in base.param_groups for p in g["params"])
            for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
                out.extend(reachable_tensors(getattr(opt, name, None)))
    return out


def _tracker():
    """PyTorch's MemTracker, taking a root module's second forward in one step (micro-batches, pipeline schedules)
    as a new call rather than an error, and keeping only the totals (module-wise statistics are not used here)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents <= {"Global"}:
                    del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state) -> None:
            # the rank's peak only: MemTracker's per-module peaks cost a pass over every module seen at each op
            for dev, now in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < now[_TOTAL_KEY]:
                    self._peak_mem[dev] = now[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(now)
                    where = sorted(self._mod_tracker.parents - {"Global"}, key=len)
                    phase = "backward" if self._mod_tracker.is_bw else "forward"
                    self.peak_where = f"{phase} {where[-1] if where else ''}"

    return StepTracker()


def measure_step(engine, batches: list[dict], lr: float = 1e-4, tracker=None) -> dict:
    """Bytes per category on this rank in the step after a warm-up step (see the module docstring); `tracker`: a
    `_tracker()` variant (the fake-tensor one of trainer/plan/fake.py)."""
    modules, optimizers = engine_parts(engine)
    engine.train()
    engine.train_step(batches)
    engine.step(lr)
    gc.collect()

    tracker = tracker or _tracker()
    tracker.track_external(*modules, *[o.optimizer if engine.name == "deepspeed" else o for o in optimizers])
    tracker.track_external(*reachable_tensors(engine), *[t for b in batches for t in b.values()])
    saved = SavedBytes(lambda: _param_storages(modules))
    figures: dict = {}
    with tracker:
        before = tracker.get_tracker_snapshot("current")
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            engine.train_step(batches)
        seen: set[int] = set()
        figures["gradients"] = _storages(_grad_tensors(engine, modules), seen)
        engine.step(lr)
    gc.collect()
    seen = set()
    figures["parameters"] = _storages(_param_tensors(engine, modules), seen)
    figures["optimizer"] = _storages(_optimizer_tensors(engine, optimizers), seen)
    figures["activations"] = saved.peak
    peak = tracker.get_tracker_snapshot("peak")
    figures["peak"] = max((snap.get("Total", 0) for snap in peak.values()), default=0)
    figures["peak_by_kind"] = {str(k): v for snap in peak.values() for k, v in snap.items() if v}
    figures["peak_where"] = getattr(tracker, "peak_where", "")
    figures["held_before"] = max((snap.get("Total", 0) for snap in before.values()), default=0)
    return figures
