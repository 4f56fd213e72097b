"""Runs several training configs in turn inside one torchrun launch (the layout tests' way to pay the start-up once):

    python -m torch.distributed.run --standalone --nproc-per-node N tests/layouts_worker.py A.yaml B.yaml ...

Each rank joins one gloo group, then runs `trainer.train.train` on each config in order, exactly as `trainer train`
does, except that the group outlives each run: the trainer joins a group only when none exists, and the worker
replaces the trainer's shutdown_distributed by a no-op, so a later run does not meet the previous run's rendezvous
keys in the store. Between runs dynamo's
caches are reset, so every compiled layout compiles its own graphs instead of hitting the recompile limit. Each
finished config prints `LAYOUT-DONE <path>` on rank 0; the first failure ends the launch with the config named.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

import trainer.train as train_module
from trainer.config import load_config


def main(paths: list[str]) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    train_module.shutdown_distributed = lambda: None  # the worker owns the group; destroyed once, below
    try:
        for path in paths:
            torch._dynamo.reset()
            try:
                train_module.train(load_config(path, []))
            except BaseException:  # noqa: BLE001 - any failure ends the launch, named
                print(f"LAYOUT-FAILED {path} on rank {rank}", file=sys.stderr, flush=True)
                traceback.print_exc()
                return 1
            if rank == 0:
                print(f"LAYOUT-DONE {path}", flush=True)
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `trainer train` ends a multi-rank run: no interpreter teardown after the gloo group
