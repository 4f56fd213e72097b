"""The `ddp` engine: torch DistributedDataParallel (ZeRO stage 0), autocast precision and fp16 loss scaling.

Every rank holds the whole model and optimizer state (16 bytes per parameter with fp32 AdamW). With tensor
parallelism and dp = 1 it trains the TP-sharded model without a data-parallel wrapper (tp with dp > 1 is fsdp's job).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.engines.base import TorchEngine
from trainer.optim import OptimizerSettings
from trainer.parallel import ParallelDims, loss_context, materialize


def _allreduce_sum_hook(group, bucket):  # no annotations: DDP checks them and this module's are strings
    """DDP's default hook averages over ranks; this one sums (the engine contract)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DDPEngine(TorchEngine):
    name = "ddp"

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
        load=None,
    ) -> None:
        materialize(model, device, seed, load)
        super().__init__(model, dims=dims, device=device, precision=precision, grad_clip=grad_clip, optim=optim)
        self.wrapped: nn.Module = model
        if dims.replicas > 1:  # dp ranks, and cp ranks (other tokens of the same samples)
            ids = [device.index] if device.type == "cuda" else None
            group = dims.group("dp_cp")
            self.wrapped = DistributedDataParallel(
                model, device_ids=ids, process_group=group, gradient_as_bucket_view=True
            )  # gradients live in the all-reduce buckets: no second copy
            self.wrapped.register_comm_hook(group, _allreduce_sum_hook)  # the contract: a plain sum

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        """Gradient all-reduce only on the last micro-batch; loss parallel under tp."""
        sync = contextlib.nullcontext() if last or self.dims.replicas == 1 else self.wrapped.no_sync()
        with sync, loss_context(self.dims.tp):
            yield

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.dtype == torch.float32:
            return self.wrapped(input_ids, labels=labels)
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.wrapped(input_ids, labels=labels)

    def layout(self) -> dict:
        return {"engine": self.name, "zero_stage": 0, "offload": "none", "model_state_bytes": 16 * self.local_params()}
