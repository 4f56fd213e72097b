"""The `ddp` engine: torch DistributedDataParallel (ZeRO stage 0), autocast precision and fp16 loss scaling.

Every rank holds the whole model and optimizer state (16 bytes per parameter with fp32 AdamW). With tensor
parallelism and dp = 1 it trains the TP-sharded model without a data-parallel wrapper (tp with dp > 1 is fsdp's job).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.engines.base import (
    DTYPES,
    LossScaler,
    load_sharded,
    local_numel,
    optimizer_step,
    save_sharded,
    unique_params,
)
from trainer.optim import OptimizerSettings, build_optimizer
from trainer.parallel import ParallelDims, loss_context, materialize


def _allreduce_sum_hook(group, bucket):  # no annotations: DDP checks them and this module's are strings
    """DDP's default hook averages over ranks; this one sums (the engine contract)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DDPEngine:
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
    ) -> None:
        materialize(model, device, seed)
        self.raw_model = model
        self.dims = dims
        self.device = device
        self.dtype = DTYPES[precision]
        self.grad_clip = grad_clip
        self.optimizer = build_optimizer(model, optim)
        if dims.dp > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(
                model, device_ids=ids, process_group=dims.group("dp"), gradient_as_bucket_view=True
            )  # gradients live in the all-reduce buckets: no second copy
            self.model.register_comm_hook(dims.group("dp"), _allreduce_sum_hook)  # the contract: a plain sum
        else:
            self.model = model
        self.scaler = LossScaler(enabled=precision == "fp16")

    def train(self, mode: bool = True) -> None:
        self.raw_model.train(mode)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        """Gradient all-reduce only on the last micro-batch; loss parallel under tp."""
        sync = contextlib.nullcontext() if last or self.dims.dp == 1 else self.model.no_sync()
        with sync, loss_context(self.dims.tp):
            yield

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(input_ids)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale_loss(loss).backward()

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        params = unique_params(self.raw_model)
        return optimizer_step(params, self.optimizer, self.scaler, grad_clip=self.grad_clip, lr=lr, skip=skip)

    def save(self, directory: Path) -> None:
        save_sharded(directory, self.raw_model, self.optimizer, {"scaler": self.scaler.state_dict()})

    def load(self, directory: Path) -> None:
        extra = load_sharded(directory, self.raw_model, self.optimizer, {"scaler": self.scaler.state_dict()})
        self.scaler.load_state_dict(extra["scaler"])

    def layout(self) -> dict:
        n_local = sum(local_numel(p) for p in unique_params(self.raw_model))
        return {"engine": self.name, "zero_stage": 0, "offload": "none", "model_state_bytes": 16 * n_local}
