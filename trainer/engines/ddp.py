"""The `ddp` engine: torch DistributedDataParallel (ZeRO stage 0), autocast precision and fp16 loss scaling."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DDPEngine:
    """Owns the wrapped model, the optimizer and the loss scaler.

    A step is: `forward` + `backward` for each micro-batch (gradients synchronised only on the last one), then `step`,
    which unscales, clips, and applies the update only when the gradient is finite."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, precision: str, grad_clip: float
    ) -> None:
        self.raw_model = model
        self.optimizer = optimizer
        self.device = device
        self.dtype = DTYPES[precision]
        self.grad_clip = grad_clip
        if dist.is_initialized() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync_context(self, last_micro_batch: bool):
        """Gradient all-reduce happens only on the last micro-batch of a step."""
        if isinstance(self.model, DistributedDataParallel) and not last_micro_batch:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with self.autocast():
            return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, skip: bool = False) -> tuple[float, bool]:
        """Returns (global grad norm before clipping, applied). A non-finite gradient (or `skip`, for a non-finite
        loss) drops the update, so it never reaches the weights."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        applied = math.isfinite(norm) and not skip
        if applied:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # on fp16 overflow this lowers the scale; it also resets the unscale bookkeeping
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
