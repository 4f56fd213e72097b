"""The training loop: one engine step per optimizer step, then the cadence (log, evaluate, checkpoint, stop).

Step s trains global samples [s*G, (s+1)*G), G = micro_batch * grad_accum * dp; the engine divides each
micro-batch's summed token loss by the target tokens of the whole global batch, so any split of the same global batch
gives the same update. Device values are read only when the loop reports (a sync on GPUs), not every step.
"""

from __future__ import annotations

import time

import torch

from trainer.checkpoint import set_rng_state
from trainer.errors import UserError
from trainer.evaluate import run_evaluation
from trainer.metrics import mem_peak_gb
from trainer.monitor import Throughput
from trainer.optim import lr_at
from trainer.parallel import ParallelDims, all_reduce_sum
from trainer.parallel.health import Heartbeat
from trainer.profiling import step_profiler
from trainer.run import Run, save_checkpoint
from trainer.stop import StopSignal


def train_loop(run: Run, stop: StopSignal, heartbeat: Heartbeat) -> dict:
    """Steps until train.steps (or a stop signal); returns the last logged metrics."""
    cfg, t, state, engine, logger = run.cfg, run.cfg.train, run.state, run.engine, run.logger
    batches = iter(run.stream)
    start_rng(run)
    engine.train()
    if cfg.checkpoint.async_ and (note := run.ckpt.use_async(engine, run.device, logger.print)):
        logger.print(note)
    finished = False
    profiler = step_profiler(run)  # None unless profile.steps or profile.memory_snapshot is set
    try:
        if stop_requested(stop, run.dims):  # a stop signal came during start-up: nothing trained, nothing to save
            where = f"the checkpoint of step {state.step} is unchanged" if state.step else "no checkpoint was written"
            logger.print(
                f"stop signal received during start-up: stopped before step {state.step + 1}; {where}; the same "
                f"command resumes"
            )
            return {}
        last, window = {}, Throughput()
        health = StepHealth(state.skipped_steps, run.device)
        while state.step < t.steps:
            if profiler is not None:  # all that profiling costs when it is off
                profiler.step(state.step)
            t0 = time.perf_counter()
            step_batches = [pinned(next(batches), run.device) for _ in range(t.grad_accum)]
            t_data = time.perf_counter() - t0
            lr = lr_at(state.step, t.lr, t.min_lr, t.warmup_steps, t.steps)
            loss = global_loss(run, *engine.train_step(step_batches))
            run.ckpt.wait_staged()  # a checkpoint in flight has copied the weights aside before the update
            grad_norm, applied = engine.step(lr, loss_finite=torch.isfinite(loss))
            run.ckpt.poll()  # publishes a checkpoint whose background write completed; never waits
            health.add(applied)
            stop_now = stop_requested(stop, run.dims)
            state.step += 1
            heartbeat.beat(state.step)
            state.tokens += run.global_batch * cfg.data.seq_len
            last_step = state.step == t.steps
            log_now = state.step % cfg.log.every == 0 or last_step or stop_now
            every = cfg.checkpoint.every
            checkpoint_now = bool(every and state.step % every == 0) or last_step or stop_now
            report_now = log_now or checkpoint_now
            if report_now:
                loss_v, norm_v, bad_in_row = health.read(run, loss, grad_norm)
            window.add(time.perf_counter() - t0, run.global_batch * cfg.data.seq_len, t_data)
            if log_now:
                last = step_record(run, window, lr, loss_v, norm_v)
                logger.log_step(last)
            if run.valid_sources and t.eval_every and (state.step % t.eval_every == 0 or last_step):
                run_evaluation(run, state.step)
            if report_now and bad_in_row >= t.max_bad_steps:
                raise UserError(
                    f"stopped at step {state.step}: {bad_in_row} steps in a row had a non-finite loss or "
                    f"gradient; lower train.lr, raise train.warmup_steps or use train.precision=bf16"
                )
            if checkpoint_now:
                save_checkpoint(run, final=last_step or stop_now)
            if stop_now:
                logger.print(f"stop signal received: stopped at step {state.step}; resume with the same command")
                break
        finished = True
    finally:
        if profiler is not None:
            profiler.close(state.step)
        run.stream.close()  # also on errors: the data workers must not outlive this rank
        if finished:  # a write still in flight is published (after an error it is left, as a crash leaves it)
            run.ckpt.close()
    return last


def start_rng(run: Run) -> None:
    """The RNG (dropout) is set last, so nothing in start-up draws from it and a resumed run continues its stream."""
    if run.rng is not None:
        set_rng_state(run.rng)
    else:  # dropout streams differ per data-parallel rank and pipeline stage; tensor-parallel peers draw the same masks
        torch.manual_seed(run.cfg.run.seed + 1000 * run.dims.dp_rank + 100_000 * run.dims.pp_rank)


def global_loss(run: Run, loss_sum: torch.Tensor, global_targets: torch.Tensor) -> torch.Tensor:
    """The step's loss over the global batch: summed over dp (tp peers hold the same value, counted once; pipeline
    stages other than the last hold 0)."""
    local = loss_sum.reshape(1) if run.dims.tp_rank == 0 else torch.zeros(1, device=run.device)
    return all_reduce_sum(local, run.dims, "world")[0] / global_targets


class StepHealth:
    """Skipped updates (non-finite loss or gradient), counted on the device; read when the loop reports."""

    def __init__(self, skipped: int, device: torch.device) -> None:
        self.skipped = torch.tensor(skipped, dtype=torch.int64, device=device)
        self.in_row = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, applied: torch.Tensor) -> None:
        self.skipped += ~applied
        self.in_row = (self.in_row + 1) * ~applied

    def read(self, run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float, int]:
        """(loss, grad norm, skipped in a row): the one read of device values; says when updates were skipped."""
        values = [loss.float(), grad_norm.float().to(loss.device), self.skipped.float(), self.in_row.float()]
        loss_v, norm_v, skipped_v, in_row = torch.stack(values).tolist()
        state = run.state
        if int(skipped_v) > state.skipped_steps:
            run.logger.print(
                f"step {state.step}: {int(skipped_v) - state.skipped_steps} update(s) skipped since the last "
                f"report for a non-finite loss or gradient (loss={loss_v}, grad_norm={norm_v}; "
                f"{int(in_row)} in a row)"
            )
        state.skipped_steps = int(skipped_v)
        return loss_v, norm_v, int(in_row)


def step_record(run: Run, window: Throughput, lr: float, loss: float, grad_norm: float) -> dict:
    """The metrics line of a logged step."""
    record = {
        "step": run.state.step,
        "tokens": run.state.tokens,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        **window.take(),
        "mem_peak_gb": mem_peak_gb(run.device),
        "skipped_steps": run.state.skipped_steps,
    }
    raises = run.peak.raises
    record["mfu"] = run.peak.mfu(record["tokens_per_s"], run.flops_per_token)
    record["peak_flops"] = run.peak.peak  # what mfu is against: a step that beat the measured peak raised it
    if run.peak.raises > raises:
        run.logger.print(f"step {run.state.step}: MFU peak raised: {run.peak.source}")
    if len(run.train_sources) > 1:
        record.update({f"samples_{name}": n for name, n in run.stream.consumed().items()})
    return record


def stop_requested(stop: StopSignal, dims: ParallelDims) -> bool:
    """Whether any rank got a stop signal. The flag is a CPU tensor, reduced by gloo (also beside NCCL on GPUs): the
    host learns it every step without waiting for the device."""
    return all_reduce_sum(torch.tensor([float(stop.received)]), dims, "world").item() > 0


def pinned(batch: dict, device: torch.device) -> dict:
    """On CUDA, the batch in page-locked memory, so that its copy to the device is asynchronous (non_blocking)."""
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch
