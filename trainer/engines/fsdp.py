"""The `fsdp` engine: PyTorch FSDP2 (`fully_shard`) on the `dp` mesh axis, composable with tensor parallelism.

Each block and then the root are sharded (one all-gather / reduce-scatter group per block). `zero_stage=3` frees the
gathered parameters after forward and gathers them again in backward; `zero_stage=2` keeps them from forward to
backward (`reshard_after_forward=False`): more memory, less communication. Gradients and optimizer state are always
sharded. Mixed precision: bf16/fp16 parameters for compute, fp32 gradient reduction and fp32 master weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from trainer.engines.base import DTYPES, TorchEngine
from trainer.optim import OptimizerSettings
from trainer.parallel import ParallelDims, loss_context, materialize


def prefetch_forward(root: FSDPModule, blocks: list[FSDPModule]) -> None:
    """Each group's forward starts the all-gather of the next block's parameters before it computes: the root (whose
    forward begins with the embeddings) gathers block 0, block i gathers block i+1, so each gather overlaps the
    compute before it. FSDP2's implicit forward prefetch needs a CUDA stream and a CPU running ahead of the GPU; this
    one holds on any device, including gloo on CPU. Backward keeps FSDP2's default: one block ahead in reverse forward
    order, which this sequential model's blocks already are."""
    order = [root, *blocks]
    for module, nxt in zip(order, blocks):
        module.set_modules_to_forward_prefetch([nxt])


def shard_model(model: nn.Module, dims: ParallelDims, zero_stage: int, precision: str) -> None:
    """FSDP2 over the dp (x cp) mesh axes: one group per block, then the root (what is left: embeddings, final norm, head)."""
    compute = None if precision == "fp32" else DTYPES[precision]
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    mesh = dims.submesh("dp_cp")  # cp ranks hold the same parameters as dp ones: sharded over both
    reshard = zero_stage == 3
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root group (embeddings, tied head, final norm) follows the stage too: at ZeRO-3 the tied vocabulary matrix,
    # often the largest single tensor, is not held whole between forward and backward.
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    prefetch_forward(model, list(model.blocks.values()))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a plain sum over dp ranks (FSDP averages by default)
            module.set_force_sum_reduction_for_comms(True)  # SUM, not PREMUL_SUM, which gloo lacks


class FSDPEngine(TorchEngine):
    name = "fsdp"

    def __init__(
        self,
        model: nn.Module,
        *,
        dims: ParallelDims,
        device: torch.device,
        precision: str,
        grad_clip: float,
        optim: OptimizerSettings,
        seed: int,
        zero_stage: int,
        load=None,
    ) -> None:
        self.zero_stage = zero_stage
        shard_model(model, dims, zero_stage, precision)
        materialize(model, device, seed, load)
        super().__init__(model, dims=dims, device=device, precision=precision, grad_clip=grad_clip, optim=optim)

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        """Reduce-scatter gradients only on the last micro-batch; earlier ones accumulate unsharded gradients."""
        self.module.set_requires_gradient_sync(last)
        with loss_context(self.dims.tp):
            yield

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(input_ids, labels=labels)

    def layout(self) -> dict:
        """fp32 AdamW: sharded master weights, gradients and two moments (16 bytes per local parameter), plus at
        ZeRO-2 the parameters held gathered from forward to backward (4 bytes per parameter of this tp rank)."""
        n_local = self.local_params()
        gathered = n_local * self.dims.replicas if self.zero_stage == 2 else 0
        state = 16 * n_local + 4 * gathered
        return {"engine": self.name, "zero_stage": self.zero_stage, "offload": "none", "model_state_bytes": state}
