"""Parallelism applied to a plain model from outside: the process grid, tensor parallel plans, and `parallelize`."""

from trainer.parallel.dims import (
    ParallelDims,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from trainer.parallel.parallelize import materialize, parallelize, unwrapped
from trainer.parallel.tensor_parallel import check_tp_degree, full_value, loss_context

__all__ = [
    "ParallelDims",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "check_tp_degree",
    "full_value",
    "init_distributed",
    "loss_context",
    "materialize",
    "parallelize",
    "shutdown_distributed",
    "unwrapped",
]
