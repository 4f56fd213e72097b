"""`train(cfg)`: one rank's whole run, in order: model shape and checks, process group, run directory lock, build
(trainer/build.py), loop (trainer/loop.py), and shutdown, with a failed collective named by the rank that caused it."""

from __future__ import annotations

import torch

from trainer.build import build_run, engine_config, pipeline_plan, resolve_model
from trainer.config import Config
from trainer.loop import train_loop
from trainer.parallel import barrier, check_tp_degree, init_distributed, shutdown_distributed
from trainer.parallel.health import Heartbeat, is_collective_failure
from trainer.run_lock import RunLock
from trainer.stop import StopSignal
from trainer.tokenizer import load_tokenizer


def train(cfg: Config, stop: StopSignal | None = None) -> dict:
    """Runs (or resumes) the configured run on this rank; returns the last logged metrics. `stop` is the StopSignal
    the caller installed as early as it could (the CLI does, before loading the config): a stop signal during
    start-up then ends the run before its first step, with a line, instead of killing the process silently."""
    stop = stop or StopSignal()
    try:
        return _train(cfg, stop)
    finally:
        stop.restore()


def _train(cfg: Config, stop: StopSignal) -> dict:
    p = cfg.parallel
    tok = load_tokenizer(cfg.data.tokenizer)
    model_cfg = resolve_model(cfg, tok)
    # a degree that cannot split the model is refused before any process group exists
    check_tp_degree(p.tp, model_cfg.tp_divisors(), cfg.data.seq_len)
    pipeline = pipeline_plan(cfg, model_cfg)
    ds_config = engine_config(cfg, model_cfg)
    need_group = p.engine != "ddp" or p.tp > 1 or p.pp > 1
    dims, device = init_distributed(p.tp, need_group=need_group, timeout_s=p.timeout_s, pp=p.pp)
    if device.type == "cuda":  # fp32 matmuls (precision=fp32, and what autocast leaves in fp32) on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    heartbeat = Heartbeat(dims, p.timeout_s).start()
    lock = RunLock(cfg.run_dir)
    try:
        run = build_run(cfg, dims, device, tok, model_cfg, ds_config, lock, pipeline)
        failed = True
        try:
            result = train_loop(run, stop, heartbeat)
            # every rank is done before any tears its connections down: a rank that closed them while a peer still
            # had point-to-point traffic in flight (pipeline stages) could abort that peer at exit
            barrier()
            failed = False
            return result
        finally:
            run.logger.close(exit_code=1 if failed else 0)  # a crashed run is marked failed in W&B
    except Exception as e:
        if is_collective_failure(e):  # name the rank that died or hung, not the socket that noticed
            raise heartbeat.failure(e) from None
        raise
    finally:
        heartbeat.stop()
        shutdown_distributed()
        lock.release()
