"""The engine interface, and the parts every engine shares: precision, loss scaling, DTensor-aware clipping, and
sharded state saved through torch.distributed.checkpoint (DCP).

Contract (the loop relies on nothing else):
- `train_step(batches)` runs the forward and backward of every micro-batch of one step (the engine's micro-batch
  context around each: gradients are synchronised only on the last) and returns (this rank's summed token loss, the
  target tokens of the whole global batch) as 0-dim device tensors. Each micro-batch's summed token loss is divided
  by the global batch's target tokens before backward; after the step's last micro-batch every parameter's gradient
  is the plain SUM over data-parallel ranks of those local gradients (engines undo whatever averaging their
  data-parallel wrapper does: DDP and FSDP divide by dp). So the update is the global-batch token mean however the
  batch is split over micro-batches and ranks.
- `eval_step(batch)` returns (summed token loss, target tokens, correct argmax predictions) of one micro-batch, in
  evaluation mode, without gradients.
- `forward(input_ids)` returns logits (a DTensor sharded over the vocabulary under tensor parallelism), for samples.
- `step(lr, loss_finite)` applies the LR, unscales, clips by the global norm and updates unless the gradient (or the
  loss: `loss_finite` false) is not finite; it returns (norm before clipping, applied) as 0-dim device tensors, read
  by the loop only when it logs, and leaves the gradients zeroed.
- `save(dir)` / `load(dir)` are collective: every rank writes or reads its own part of model and optimizer state.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Partial, Replicate

from trainer.errors import UserError
from trainer.models.layers import token_loss_sum
from trainer.optim import OptimizerSettings, build_optimizer
from trainer.parallel import ParallelDims, all_reduce_sum, full_value, loss_context

# DCP says it saves "in a single process" when there is no process group: that is the intent, not news.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DCP_DIR = "dcp"  # inside a checkpoint directory: model and optimizer state keyed by parameter name


class Engine(Protocol):
    """What the training loop, evaluation and checkpointing may use of an engine (see the module docstring)."""

    name: str
    dtype: torch.dtype  # the compute precision of matmuls (for the MFU peak)

    def train(self, mode: bool = True) -> None: ...

    def train_step(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def eval_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def step(self, lr: float, loss_finite: torch.Tensor | bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def layout(self) -> dict:
        """engine, zero_stage, offload and the expected model-state bytes of this rank."""
        ...


class MicroBatchSteps:
    """`train_step` and `eval_step` for engines that run a step as micro-batches on every rank (ddp, fsdp,
    deepspeed): each provides `dims`, `device`, `micro_batch(last)` (its context: gradient sync on the last),
    `forward` and `backward`."""

    dims: ParallelDims
    device: torch.device

    def train_step(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        # the whole samples' targets, counted on the host before the copy (cp peers count the same samples)
        local_targets = sum(int((b["labels"] != -100).sum()) for b in batches)
        targets = torch.tensor([float(local_targets)], device=self.device)
        global_targets = all_reduce_sum(targets, self.dims, "dp")[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        cp = getattr(self.module, "seq_shard", None)  # context parallelism: this rank's tokens of each sample
        with cp.sharding() if cp else contextlib.nullcontext():
            for i, batch in enumerate(batches):
                batch = cp.shard(batch) if cp else batch
                labels = batch["labels"].to(self.device, non_blocking=True)
                with self.micro_batch(last=i == len(batches) - 1):
                    loss = self.forward(batch["input_ids"].to(self.device, non_blocking=True), labels)
                    self.backward(loss / global_targets)
                loss_sum += full_value(loss.detach())
        return loss_sum, global_targets

    @torch.no_grad()
    def eval_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Under context parallelism, over this rank's tokens (the caller sums over dp and cp)."""
        cp = getattr(self.module, "seq_shard", None)
        batch = cp.shard(batch) if cp else batch
        labels = batch["labels"].to(self.device)
        with loss_context(self.dims.tp), cp.sharding() if cp else contextlib.nullcontext():
            logits = self.forward(batch["input_ids"].to(self.device))
            loss_sum = full_value(token_loss_sum(logits, labels))
        mask = labels != -100
        correct = ((full_value(logits).argmax(-1) == labels) & mask).sum()  # gathers vocab shards: eval only
        return loss_sum, mask.sum(), correct


class LossScaler:
    """Dynamic loss scaling for fp16 (off otherwise), driven by the GLOBAL gradient norm, so every rank of every
    layout takes the same decision: halve the scale and skip on overflow, double it after `growth_interval` good
    steps (torch.amp.GradScaler's policy; its per-rank inf check would need one more all-reduce under sharding). The
    scale and the good-step count live on the device and are updated there: the host reads them only to save them."""

    def __init__(
        self,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        device: torch.device | None = None,
    ) -> None:
        self.enabled = enabled
        self.growth_interval = growth_interval
        self._scale = torch.tensor(init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self._good_steps = torch.zeros((), dtype=torch.int32, device=device)

    @property
    def scale(self) -> float:
        return float(self._scale)

    @property
    def scale_tensor(self) -> torch.Tensor:
        return self._scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale if self.enabled else loss

    def update(self, finite: torch.Tensor) -> None:
        """`finite`: a bool tensor, this step's verdict on the gradients."""
        if self.enabled:
            found_inf = (~finite).to(torch.float32)
            torch._amp_update_scale_(self._scale, self._good_steps, found_inf, 2.0, 0.5, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": float(self._scale), "good_steps": int(self._good_steps)}

    def load_state_dict(self, state: dict) -> None:
        self._scale.fill_(float(state["scale"]))
        self._good_steps.fill_(int(state["good_steps"]))


def _sharded_mesh_dims(t: DTensor) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(t.placements) if not isinstance(p, Replicate))


@torch.no_grad()
def global_grad_norm(grads: list[torch.Tensor], across: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The L2 norm of all gradients as one vector, whatever mix of plain tensors and DTensors (sharded on any mesh
    axes) they are: squared local norms are summed over the mesh axes each tensor is sharded on, with one all-reduce
    per distinct (mesh, sharded axes) group, then over `across` (the pipeline stages, each holding other layers)."""
    device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    meshes = {}
    for g in grads:
        if isinstance(g, DTensor):
            key = (id(g.device_mesh), _sharded_mesh_dims(g))
            meshes[key[0]] = g.device_mesh
            groups[key].append(g.to_local())
        else:
            groups[None].append(g)
    for key, tensors in groups.items():
        sq = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]).square().sum()
        if key is not None:
            mesh, sharded = meshes[key[0]], key[1]
            for dim in sharded:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        total += sq
    if across is not None and dist.get_world_size(across) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=across)
    return total.sqrt()


@torch.no_grad()
def reduce_partial_grads(params: list[nn.Parameter]) -> None:
    """Parameters replicated over tp but fed sequence-sharded activations (sequence-parallel norms) get gradients
    that are pending sums (Partial) over tp; reduce them once, before norms and the optimizer read them."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
            placements = [Replicate() if isinstance(pl, Partial) else pl for pl in g.placements]
            p.grad = g.redistribute(g.device_mesh, placements)


def optimizer_step(
    params: list[nn.Parameter],
    optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer],
    scaler: LossScaler,
    *,
    grad_clip: float,
    lr: float,
    loss_finite: torch.Tensor | bool = True,
    norm_across: dist.ProcessGroup | None = None,
    not_in_norm: frozenset[int] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared end of a step: reduce pending tp sums, take the global norm of the unscaled gradients, and update
    with them unscaled and clipped to `grad_clip` (0: no clipping) unless the norm or the loss (`loss_finite`) is not
    finite; zero the gradients. Returns (norm before clipping, applied) as 0-dim device tensors. A pipeline passes one
    optimizer per stage, the stages' group as `norm_across`, and the ids of parameters that copy another's
    (a tied head on the last stage) as `not_in_norm`.

    Nothing here waits for the device. With PyTorch's fused AdamW (every engine but a mixed DTensor/plain layout) the
    unscale and the clip factor go into its `grad_scale` and the skip into its `found_inf`, as torch.amp.GradScaler
    drives it: the kernel divides the gradients as it reads them and leaves weights, moments and step count untouched
    on an overflow. The unfused fallback scales the gradients first and reads the verdict on the host."""
    reduce_partial_grads(params)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(()), torch.ones((), dtype=torch.bool)
    scale = scaler.scale_tensor
    norm = global_grad_norm([p.grad for p in params if p.grad is not None and id(p) not in not_in_norm], norm_across)
    if scaler.enabled:
        norm = norm / scale
    finite = torch.isfinite(norm) & torch.as_tensor(loss_finite, device=norm.device)
    # the clip factor: max_norm / norm where the norm exceeds max_norm (the epsilon as in torch's clip_grad_norm_)
    clip = (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip > 0 else torch.ones_like(norm)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
        if optimizer.defaults.get("fused"):
            optimizer.grad_scale = scale / clip if scaler.enabled else clip.reciprocal()
            optimizer.found_inf = (~finite).to(torch.float32)
            optimizer.step()
        else:
            group_grads = [_local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(group_grads, (clip / scale) if scaler.enabled else clip)
            if bool(finite):
                optimizer.step()
    scaler.update(finite)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return norm, finite


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class TorchEngine(MicroBatchSteps):
    """What the ddp and fsdp engines share: the optimizer built on `module`'s parameters as the engine left them
    (whole or sharded), loss scaling, the end of a step, and DCP save/load. Subclasses wrap or shard `module` first
    and provide `name`, `micro_batch`, `forward` and `layout`."""

    def __init__(
        self,
        module: nn.Module,
        *,
        dims: ParallelDims,
        device: torch.device,
        precision: str,
        grad_clip: float,
        optim: OptimizerSettings,
    ) -> None:
        self.module = module
        self.dims = dims
        self.device = device
        self.dtype = DTYPES[precision]
        self.grad_clip = grad_clip
        self.optimizer = build_optimizer(module, optim)
        self.scaler = LossScaler(enabled=precision == "fp16", device=device)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale_loss(loss).backward()

    def step(self, lr: float, loss_finite: torch.Tensor | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        params = unique_params(self.module)
        return optimizer_step(
            params, self.optimizer, self.scaler, grad_clip=self.grad_clip, lr=lr, loss_finite=loss_finite
        )

    def save(self, directory: Path) -> None:
        save_sharded(directory, [(self.module, self.optimizer)], {"scaler": self.scaler.state_dict()})

    def load(self, directory: Path) -> None:
        require_dcp(directory)
        extra = load_sharded(directory, [(self.module, self.optimizer)], {"scaler": self.scaler.state_dict()})
        self.scaler.load_state_dict(extra["scaler"])

    def local_params(self) -> int:
        """Parameters this rank holds (its shards, or everything)."""
        return sum(local_numel(p) for p in unique_params(self.module))


def require_dcp(directory: Path) -> None:
    if not (directory / DCP_DIR).is_dir():
        raise UserError(
            f"checkpoint {directory} has no {DCP_DIR}/ state (written by parallel.engine=deepspeed or an older "
            f"version): resume it with the engine that wrote it, or start a fresh run"
        )


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# Optimizer state keyed "state.<parameter name>.<exp_avg|exp_avg_sq|step>": the same keys whatever holds the parameter
# (one model, or the pipeline stage that has it). Hyper-parameters (param_groups) come from the config, not the file.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _renamed(key: str, aliases: dict[str, str]) -> str:
    """An optimizer state key under the name the whole model gives the parameter (a tied head's copy: the
    embedding's)."""
    for alias, name in aliases.items():
        if key.startswith(f"state.{alias}."):
            return f"state.{name}." + key[len(f"state.{alias}.") :]
    return key


def _gather(parts: list[tuple[nn.Module, torch.optim.Optimizer]], aliases: dict[str, str]) -> tuple[list, dict, dict]:
    states = [get_state_dict(module, optimizer, options=FLAT) for module, optimizer in parts]
    model, optim = {}, {}
    for model_sd, optim_sd in states:
        model.update(model_sd)
        optim.update({_renamed(k, aliases): v for k, v in optim_sd.items() if k.startswith("state.")})
    return states, model, optim


def save_sharded(
    directory: Path,
    parts: list[tuple[nn.Module, torch.optim.Optimizer]],
    extra: dict,
    aliases: dict[str, str] | None = None,
) -> None:
    """Every rank writes its shards of model and optimizer state (keyed by parameter name) of each of its (module,
    optimizer) parts into `directory/dcp`; DCP's file writer fsyncs each file before the collective save returns
    (or, under checkpoint.async, before the background write's future completes: trainer/engines/dcp_write.py).
    `aliases`: parameter names saved under another name's optimizer state (a pipeline's tied head copy)."""
    from trainer.engines.dcp_write import write

    _, model, optim = _gather(parts, aliases or {})
    state = {"model": model, "optim": optim, "extra": extra}
    write(state, directory / DCP_DIR)


def load_sharded(
    directory: Path,
    parts: list[tuple[nn.Module, torch.optim.Optimizer]],
    extra: dict,
    aliases: dict[str, str] | None = None,
) -> dict:
    """Reads model and optimizer state saved by any layout into this one (DCP reshards); returns `extra` filled in."""
    aliases = aliases or {}
    states, model, optim = _gather(parts, aliases)
    state = {"model": model, "optim": optim, "extra": extra}
    dcp.load(state, checkpoint_id=str(directory / DCP_DIR), no_dist=not dist.is_initialized())
    for (module, optimizer), (model_sd, optim_sd) in zip(parts, states):
        loaded = {
            k: (state["optim"][_renamed(k, aliases)] if k.startswith("state.") else v) for k, v in optim_sd.items()
        }
        model_sd = {k: state["model"][k] for k in model_sd}
        set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=loaded, options=FLAT)
    return state["extra"]


def fsync(path: Path) -> None:
    """Flushes a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_numel(p: torch.Tensor) -> int:
    return _local(p).numel()
