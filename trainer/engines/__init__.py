"""Engines wrap a model for data parallelism behind one small interface: forward/backward/step/state.

Only `ddp` exists in this version; `fsdp` (FSDP2) and `deepspeed` slot in beside it with the same interface."""

from __future__ import annotations

from trainer.engines.ddp import DDPEngine

__all__ = ["DDPEngine", "build_engine"]


def build_engine(name: str, **kwargs) -> DDPEngine:
    if name == "ddp":
        return DDPEngine(**kwargs)
    raise ValueError(f"unknown engine {name}")
