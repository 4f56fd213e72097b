"""Profiler traces and CUDA memory snapshots, switched on from the config (`profile.steps`, `profile.memory_snapshot`).

- `profile.steps: [A, B]`: each rank writes a `torch.profiler` trace of training steps A to B (counted from 1, both
  included) to RUN_DIR/profile/rank<R>_step<A>-<B>.json (`rank<R>_step<A>.json` for one step), Chrome's trace format:
  open it in https://ui.perfetto.dev or chrome://tracing. Each step is a `ProfilerStep#<N>` range, N the training
  step. The profiler starts one step early where it can (a warm-up step, not recorded), so its own start-up does not
  land in step A. CPU activity always; CUDA kernels too on GPUs.
- `profile.memory_snapshot: true` (CUDA only): the caching allocator records every allocation and free from start-up
  (with its stack, the last 100,000 events); the history is written to RUN_DIR/profile/rank<R>_memory_step<N>.pickle
  after step B of `profile.steps` (after the first step without them), and to rank<R>_memory_oom[_step<N>].pickle
  when the rank runs out of memory, before it exits with its one line. Open them at https://pytorch.org/memory_viz.

With both off the loop pays one `if profiler is not None` per step and nothing else (`step_profiler` returns None).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config import ProfileConfig
    from trainer.run import Run

SNAPSHOT_ENTRIES = 100_000  # allocator events kept in the history (torchtitan keeps as many)
VIEWERS = {"trace": "https://ui.perfetto.dev", "memory": "https://pytorch.org/memory_viz"}
# what a rank out of memory knows of where it was: the step it was running (set by the profiler, when one is on)
_AT: dict = {"step": None}


def check_profile(p: ProfileConfig, train_steps: int) -> None:
    """The values of the profile section, refused in one line (config check time, on any machine)."""
    if p.steps is None:
        return
    example = f"e.g. profile.steps=[{min(2, train_steps)},{min(3, train_steps)}]"
    if len(p.steps) != 2:
        raise UserError(f"profile.steps={p.steps} must be two step numbers [first, last], {example} (one step: [3,3])")
    first, last = p.steps
    if first < 1 or last < 1:
        raise UserError(f"profile.steps={p.steps}: steps count from 1 (the first training step), {example}")
    if last < first:
        raise UserError(f"profile.steps={p.steps} ends before it starts: give [first, last] with first <= last")
    if last > train_steps:
        raise UserError(
            f"profile.steps={p.steps} goes beyond train.steps={train_steps}: profile steps the run trains, {example}"
        )


def check_memory_snapshot(p: ProfileConfig) -> None:
    """profile.memory_snapshot records the CUDA caching allocator: refused in one line where there is no GPU, before
    anything is built. Not part of `check_profile`: a config checked on a machine without GPUs (a login node) may be
    meant for one with them."""
    if p.memory_snapshot and not torch.cuda.is_available():
        raise UserError(
            "profile.memory_snapshot=true records CUDA memory and needs a GPU (torch sees none here): set "
            "profile.memory_snapshot=false (profile.steps traces work on CPU too)"
        )


def record_memory_history(p: ProfileConfig) -> None:
    """Starts the allocator's history (profile.memory_snapshot), once the rank's device is set: from here every
    allocation of model, optimizer and steps is in the snapshots."""
    if p.memory_snapshot:
        torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)


def dump_memory_snapshot(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return path


def profile_dir(run_dir: Path) -> Path:
    return run_dir / "profile"


def out_of_memory(error: torch.OutOfMemoryError, cfg) -> UserError:
    """The one line a rank that ran out of memory exits with; first, with profile.memory_snapshot, the allocator's
    history is written (what was allocated, by which code, up to the failed allocation)."""
    rank = int(os.environ.get("RANK", "0"))
    step = _AT["step"]
    at = f" at step {step}" if step is not None else ""
    what = str(error).strip().splitlines()[0] if str(error).strip() else "torch.OutOfMemoryError"
    fix = (
        "lower train.micro_batch (raise train.grad_accum to keep the batch), set train.activation_checkpointing=full "
        "or shard more (parallel.engine=fsdp); `trainer plan CONFIG --gpus N` shows what fits"
    )
    if cfg.profile.memory_snapshot and torch.cuda.is_available():
        name = f"rank{rank}_memory_oom" + (f"_step{step}" if step is not None else "") + ".pickle"
        try:
            path = dump_memory_snapshot(profile_dir(cfg.run_dir) / name)
            shown = f"memory snapshot {path} (open it at {VIEWERS['memory']})"
        except (OSError, RuntimeError) as e:
            shown = f"the memory snapshot could not be written ({e})"
    else:
        shown = "profile.memory_snapshot=true records where the memory went"
    return UserError(f"rank {rank} ran out of memory{at} ({what}): {fix}; {shown}")


class StepProfiler:
    """The loop's profiling for one (re)start of a run: `step(done)` before each step (`done` steps trained so
    far), `close(done)` when the loop ends, however it ends."""

    def __init__(self, p: ProfileConfig, run_dir: Path, rank: int, device: torch.device, done: int, say) -> None:
        self.first, self.last = p.steps if p.steps else (None, None)
        self.dir, self.rank, self.device, self.say = profile_dir(run_dir), rank, device, say
        self.prof: torch.profiler.profile | None = None
        self.traced = False
        self.snapshot_at = (self.last if p.steps else done + 1) if p.memory_snapshot else None
        self.start_step = done + 1

    def step(self, done: int) -> None:
        """Before step done + 1: starts the profiler (one step early to warm it up, where this run has that step),
        moves it to the next step, or stops it after the last profiled step; writes the memory snapshot that is due."""
        s = done + 1
        _AT["step"] = s
        if self.snapshot_at is not None and done == self.snapshot_at:
            self._snapshot(done)
        if self.first is None or self.traced:
            return
        if self.prof is None:
            if self.first - 1 <= s <= self.last:
                self._start(s)
        elif done >= self.last:
            self._stop()
        else:
            self.prof.step()

    def close(self, done: int) -> None:
        """The end of the loop: a trace in progress is written with the steps it holds; a snapshot due now too."""
        if self.prof is not None:
            self._stop()
        if self.snapshot_at is not None and done == self.snapshot_at:
            self._snapshot(done)
        _AT["step"] = None

    def _start(self, s: int) -> None:
        first, last = self.first, self.last

        def action(n: int) -> ProfilerAction:
            n = max(n, s)  # torch asks for step 0 on construction: answer as for the step it starts at
            if n < first:
                return ProfilerAction.WARMUP
            return ProfilerAction.RECORD if n < last else ProfilerAction.RECORD_AND_SAVE

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, schedule=action, on_trace_ready=self._write, record_shapes=True
        )
        self.prof.step_num = s  # its ProfilerStep#N ranges then carry the training step's number
        self.prof.start()

    def _stop(self) -> None:
        prof, self.prof = self.prof, None
        prof.stop()  # writes the trace (on_trace_ready) when any step was recorded
        self.traced = True

    def _write(self, prof: torch.profiler.profile) -> None:
        first, last = max(self.first, self.start_step), prof.step_num
        steps = f"{first}" if first == last else f"{first}-{last}"
        path = self.dir / f"rank{self.rank}_step{steps}.json"
        t0 = time.perf_counter()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
        except OSError as e:  # a trace that cannot be written does not stop the run
            self.say(f"profile: the trace of steps {steps} could not be written to {path}: {e}")
            return
        self.say(
            f"profile: steps {steps} traced into {path} in {time.perf_counter() - t0:.1f} s (one file per rank; open "
            f"it in {VIEWERS['trace']})"
        )

    def _snapshot(self, done: int) -> None:
        self.snapshot_at = None
        path = dump_memory_snapshot(self.dir / f"rank{self.rank}_memory_step{done}.pickle")
        self.say(f"profile: CUDA memory history up to step {done} in {path} (open it at {VIEWERS['memory']})")


def step_profiler(run: Run) -> StepProfiler | None:
    """The loop's profiler, or None when profiling is off (the loop then pays one `is not None` per step)."""
    p = run.cfg.profile
    if not p.steps and not p.memory_snapshot:
        return None
    return StepProfiler(p, run.cfg.run_dir, run.dims.rank, run.device, run.state.step, run.logger.print)
