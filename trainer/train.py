"""`train(cfg)`: one rank's whole run, in order: model shape and checks, process group, run directory lock, build
(trainer/build.py), loop (trainer/loop.py), and shutdown, with a failed collective named by the rank that caused it."""

from __future__ import annotations

import os
import sys

import torch

from trainer.build import build_run, check_layout, engine_config, pipeline_plan, resolve_model
from trainer.config import Config
from trainer.loop import train_loop
from trainer.metrics import named_peak
from trainer.models import ModelConfig
from trainer.parallel import ParallelDims, barrier, check_tp_degree, init_distributed, shutdown_distributed
from trainer.parallel.context_parallel import check_cp
from trainer.parallel.dims import check_world
from trainer.parallel.health import Heartbeat, is_collective_failure
from trainer.parallel.pipeline import PipelinePlan
from trainer.plan.memory import device_memory, predict_run
from trainer.profiling import check_memory_snapshot, out_of_memory, record_memory_history
from trainer.run_lock import RunLock
from trainer.stop import StopSignal
from trainer.tokenizer import TokenizerInfo, load_tokenizer
from trainer.writable import check_writable_dir


def train(cfg: Config, stop: StopSignal | None = None) -> dict:
    """Runs (or resumes) the configured run on this rank; returns the last logged metrics. `stop` is the StopSignal
    the caller installed as early as it could (the CLI does, before loading the config): a stop signal during
    start-up then ends the run before its first step, with a line, instead of killing the process silently."""
    stop = stop or StopSignal()
    try:
        check_memory_snapshot(cfg.profile)  # before anything is built
        return _train(cfg, stop)
    except torch.OutOfMemoryError as e:  # one line (with profile.memory_snapshot, after writing the snapshot)
        raise out_of_memory(e, cfg) from None
    finally:
        stop.restore()


def warn_if_too_big(predicted, device: torch.device, dims) -> None:
    """Before the model is built: say so when the formula's peak per rank exceeds what a rank has (a warning, not a
    refusal: the formula can be wrong, and the user may know better)."""
    if predicted is None or not dims.is_main:
        return
    have = device_memory(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if have is not None and predicted.peak > have[0]:
        print(
            f"warning: the predicted peak of {predicted.peak / 2**30:,.2f} GiB per rank ({predicted.peak_at}) exceeds "
            f"{have[1]} of {have[0] / 2**30:,.2f} GiB: this run will likely run out of memory; `trainer plan CONFIG "
            f"--gpus {dims.world_size}` lists layouts that fit",
            file=sys.stderr,
            flush=True,
        )


def check_before_start(cfg: Config, world: int) -> tuple[TokenizerInfo, ModelConfig, PipelinePlan | None, dict | None]:
    """Every check of the config `trainer train` makes before any process group exists, for a job of `world` ranks:
    the tokenizer and model shape, the degrees against the model and the world size, the pipeline and DeepSpeed
    settings, and run.dir. Writes nothing; `launch local`/`launch slurm` call it to refuse a bad config before any
    rank starts. Returns the tokenizer, model config, pipeline plan and DeepSpeed config the run is built from."""
    p = cfg.parallel
    named_peak()  # a bad $TRAINER_PEAK_TFLOPS is refused here too, not by every rank once the job runs
    tok = load_tokenizer(cfg.data.tokenizer)
    model_cfg = resolve_model(cfg, tok)
    # a degree that cannot split the model is refused before any process group exists
    check_tp_degree(p.tp, model_cfg.tp_divisors(), cfg.data.seq_len)
    check_cp(p.cp, cfg.data.seq_len, p.tp, model_cfg.arch, p.engine, p.pp)
    pipeline = pipeline_plan(cfg, model_cfg, world)
    ds_config = engine_config(cfg, model_cfg, world)
    dp = check_world(world, p.tp, p.pp, p.cp)
    check_layout(cfg, ParallelDims(world_size=world, rank=0, local_rank=0, dp=dp, tp=p.tp, pp=p.pp, cp=p.cp), model_cfg)
    for where in (cfg.run_dir, cfg.run_dir / "checkpoints"):  # a read-only mount would fail the first save
        check_writable_dir(where, "run.dir")
    return tok, model_cfg, pipeline, ds_config


def _train(cfg: Config, stop: StopSignal) -> dict:
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok, model_cfg, pipeline, ds_config = check_before_start(cfg, world)
    need_group = p.engine != "ddp" or p.tp > 1 or p.pp > 1 or p.cp > 1
    dims, device = init_distributed(p.tp, need_group=need_group, timeout_s=p.timeout_s, pp=p.pp, cp=p.cp)
    record_memory_history(cfg.profile)  # profile.memory_snapshot: from here, once the rank's GPU is set
    predicted = predict_run(cfg, model_cfg, dims.world_size)
    warn_if_too_big(predicted, device, dims)
    if device.type == "cuda":  # fp32 matmuls (precision=fp32, and what autocast leaves in fp32) on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    heartbeat = Heartbeat(dims, p.timeout_s).start()
    lock = RunLock(cfg.run_dir)
    try:
        run = build_run(cfg, dims, device, tok, model_cfg, ds_config, lock, pipeline, predicted)
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
