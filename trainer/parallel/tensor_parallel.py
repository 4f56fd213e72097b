"""Megatron-style tensor parallelism with DTensor on the `tp` mesh axis, plus sequence parallelism: each family
brings its plan (trainer/models/<family>/tensor_parallel.py, pieces in trainer/models/tp_plans.py); this module checks
the degree, applies the plan, and gives the loop what it needs around vocab-sharded logits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from trainer.errors import UserError
from trainer.models import family


def check_tp_degree(tp: int, divisors: dict[str, int], seq_len: int) -> None:
    """Refuses degrees that do not split the model's dimensions (`divisors`: config key -> value, the family's
    `tp_divisors()`: heads, MLP width, ...; the vocabulary is padded instead) and the sequence evenly, before any
    work."""
    for key, value in {**divisors, "data.seq_len": seq_len}.items():
        if value % tp:
            fix = {"data.seq_len": "data.seq_len (sequence parallelism splits it)"}.get(key, key)
            raise UserError(
                f"parallel.tp={tp} does not divide {key}={value}: choose a tp that divides it or change {fix}"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shards `model` in place over `tp_mesh` with its family's plan."""
    family(model.config.arch).apply_tensor_parallel(model, tp_mesh)


def loss_context(tp: int):
    """Cross-entropy over vocab-sharded logits (forward and backward) needs `loss_parallel` when tp > 1."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the whole value of `t` (gathers a sharded DTensor; for losses and evaluation)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
