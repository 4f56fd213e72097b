"""`parallelize`: the steps that turn a plain model (built on the meta device) into the one a rank trains.

Order (as torchtitan): tensor parallel, context parallel, activation checkpointing, compile; the engine then applies
data parallelism
(DDP or FSDP2) and calls `materialize`, which allocates only this rank's shard of every parameter and initialises it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor, Replicate
from torch.overrides import TorchFunctionMode

from trainer.models.layers import loss_chunk_rows
from trainer.parallel.context_parallel import ContextParallel, apply_context_parallel
from trainer.parallel.dims import ParallelDims
from trainer.parallel.tensor_parallel import apply_tensor_parallel

WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")  # what compile and checkpoint wrappers add to names


def unwrapped(name: str) -> str:
    """A parameter's name as the plain model has it (the global names checkpoints and exports use)."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute block activations in backward: `full` wraps every block, `selective` every other block. (`full`
    also chunks the head and loss: see `parallelize`.)"""
    if mode == "none":
        return
    every = 1 if mode == "full" else 2
    for i, (name, block) in enumerate(list(model.blocks.items())):
        if i % every == 0:
            model.blocks[name] = checkpoint_wrapper(block)


def apply_compile(model: nn.Module, output: bool) -> None:
    """Compiles each block in place (parameter names unchanged); repeated blocks reuse one compiled graph. A
    checkpointed block is compiled inside its checkpoint wrapper: recomputation then reruns the compiled graph (and
    compiling the wrapper itself fails under tensor parallelism: the DTensor mesh ends up among saved tensors).

    `output` also compiles the model's `output` (final norm, LM head and loss) as one graph: inductor fuses the fp32
    log-softmax over the vocabulary and its gradient around the head's matmul, which small models spend most of their
    step on (1.2x the step at 16M parameters and vocab 50k on CPU). Left eager under tensor parallelism, where the
    logits are vocab-sharded DTensors reduced by loss_parallel."""
    for block in model.blocks.values():
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        inner.compile()
    if output:
        model.output = torch.compile(model.output)


def parallelize(model: nn.Module, dims: ParallelDims, activation_checkpointing: str, compile: bool) -> nn.Module:
    """Applies tensor parallelism (tp > 1), context parallelism (cp > 1), activation checkpointing and compile in
    place; data parallelism is the engine's job."""
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.submesh("tp"))
    if dims.cp > 1:
        apply_context_parallel(model, ContextParallel(dims.group("cp"), dims.cp, dims.cp_rank))
    apply_activation_checkpointing(model, activation_checkpointing)
    if activation_checkpointing == "full" and dims.tp == 1:
        # outside the blocks the (tokens x vocab) logits dominate what is saved: compute head and loss in chunks too
        # (under tp the logits are vocab-sharded and loss_parallel needs them whole over the tokens)
        model.loss_chunk_rows = loss_chunk_rows(model.config.vocab_size)
    if compile:
        apply_compile(model, output=dims.tp == 1)
    return model


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Writes the whole tensor `full` into `param`: all of it, or this rank's shard of a DTensor."""
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim)
        param.to_local().copy_(whole.redistribute(mesh, param.placements).to_local())
    else:
        param.copy_(full)


class _ShardedInit(TorchFunctionMode):
    """Makes random init of a sharded (DTensor) parameter equal to the init of the whole tensor: the full tensor is
    drawn from the global RNG, as a single process would draw it, and this rank keeps its shard. Only one parameter is
    ever whole at a time, and the RNG stream (hence every weight) is the same for every layout and seed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.init.normal_ or func is torch.Tensor.normal_:
            param = args[0] if args else kwargs["tensor"]
            if isinstance(param, DTensor):
                mean, std = list(args[1:3]) + [kwargs.get("mean", 0.0), kwargs.get("std", 1.0)][len(args[1:3]) :]
                full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
                full.normal_(mean, std, generator=kwargs.get("generator"))
                copy_full_into(param, full)
                return param
        return func(*args, **kwargs)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int, load: Callable | None = None) -> None:
    """Allocates the meta-device `model` on `device` (each rank only its shards) and initialises it from `seed`:
    the same weights as `torch.manual_seed(seed); model.init_weights()` on a whole, unsharded model. `load(model)`,
    when given, then overwrites them (a Hugging Face checkpoint: `model.init_from`)."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with _ShardedInit():
        model.init_weights()
    if load is not None:
        load(model)
