"""How long a checkpoint blocks training: synchronous saves against checkpoint.async, side by side in one job.

    python bench/async_checkpoint.py [--saves 3] [--quick]

2 ranks under torchrun (gloo, CPU, fp32, 1 thread each), FSDP ZeRO-3, the ~83M-parameter GPT of bench/memory.py
(8 x 768, vocab 32768, seq 128, micro_batch 1). Each rank builds the engine as `trainer train` does and saves through
the trainer's own Checkpointer into a temporary directory. After a warm-up save of each kind (the async one allocates
its host staging copy, kept for the run), it times `--saves` saves of each kind:
- sync: `Checkpointer.save` from call to return (DCP write, fsync, manifest, rename, `latest`): the step is blocked
  for all of it;
- async: the time the step is blocked: the `save` call (state dict, small files, the write handed to the background),
  the wait for the staging copy before the next optimizer step, and rank 0's publishing once the write is complete;
  and the extra time of the steps that ran while the write was in flight (their time beyond the median step time with
  no save, the blocked parts not counted).
Blocked times are the slower rank's. Prints one table and the ratio async blocked / sync save (target <= 25%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from memory import SIZES, build, cpu_model, describe

from trainer.checkpoint import Checkpointer

MARK = "ASYNC_CKPT_BENCH_RESULT "
RANKS = 2
LAYOUT = ["parallel.engine=fsdp", "parallel.zero_stage=3"]


def worker(size: dict, saves: int, directory: Path) -> None:
    torch.set_num_threads(1)
    dims, engine, counts = build(size, LAYOUT, need_group=True)
    ckpt = Checkpointer(directory, keep=2, dims=dims)
    state = {"train_state": {"step": 0}, "model_config": {}}
    gen = torch.Generator().manual_seed(dims.dp_rank)
    mb, seq = size["micro_batch"], size["seq"]

    def batches() -> list[dict]:
        ids = torch.randint(0, size["vocab_size"], (mb, seq + 1), generator=gen)
        return [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]

    def step() -> dict:
        """One training step as the loop runs it; returns its time and the parts of it that waited on a save."""
        t0 = time.perf_counter()
        engine.train_step(batches())
        t1 = time.perf_counter()
        ckpt.wait_staged()
        t2 = time.perf_counter()
        engine.step(1e-4)
        t3 = time.perf_counter()
        ckpt.poll()
        t4 = time.perf_counter()
        return {"total": t4 - t0, "wait_staged": t2 - t1, "publish": t4 - t3}

    def all_done(done: bool) -> bool:
        flag = torch.tensor([0.0 if done else 1.0])
        dist.all_reduce(flag)
        return flag.item() == 0

    for _ in range(2):
        step()
    base = statistics.median(step()["total"] for _ in range(4))
    n = 0

    sync = []
    for i in range(saves + 1):
        step()
        n += 1
        t0 = time.perf_counter()
        ckpt.save(n, engine, state, None)
        if i:  # the first is a warm-up
            sync.append(time.perf_counter() - t0)

    ckpt.use_async(engine, engine.device, say=lambda line: None)  # on a GPU: staged in pinned host memory
    runs = []
    for i in range(saves + 1):
        step()
        n += 1
        t0 = time.perf_counter()
        ckpt.save(n, engine, state, None, in_background=True)
        blocked = time.perf_counter() - t0
        start = blocked
        in_flight, extra, steps_in_flight = True, 0.0, 0
        while in_flight:
            s = step()
            blocked += s["wait_staged"] + s["publish"]
            extra += s["total"] - s["wait_staged"] - s["publish"] - base
            steps_in_flight += 1
            in_flight = not all_done(ckpt.pending is None)
        runs.append(
            {"blocked": blocked, "save_call": start, "extra": extra, "steps": steps_in_flight, "warmup": i == 0}
        )
    ckpt.close()
    result = {"rank": dims.rank, "base_step": base, "sync": sync, "async": runs, "n_params": counts["n_params"]}
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, result)
    if dims.is_main:
        print(MARK + json.dumps(gathered), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=3, help="timed saves of each kind after a warm-up one (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny dims: a fast check that the script works")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    size = SIZES["quick" if args.quick else "full"]["state"]
    if args.worker:
        worker(size, args.saves, Path(args.worker))
        dist.barrier()
        os._exit(0)  # as bench/memory.py: skip interpreter shutdown with the gloo groups' threads alive

    work = Path(tempfile.mkdtemp(prefix="async_ckpt_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}"]
    cmd += [str(Path(__file__).resolve()), "--worker", str(work / "checkpoints"), "--saves", str(args.saves)]
    cmd += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=REPO, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker failed (exit {proc.returncode})")
    ranks = json.loads(lines[-1][len(MARK) :])
    on_disk = sum(f.stat().st_size for f in (work / "checkpoints").rglob("*") if f.is_file()) / 2  # keep=2
    subprocess.run(["rm", "-rf", str(work)], check=False)

    def slowest(values: list[list[float]]) -> list[float]:
        return [max(v) for v in zip(*values)]

    sync = slowest([r["sync"] for r in ranks])
    timed = [[a for a in r["async"] if not a["warmup"]] for r in ranks]
    blocked = slowest([[a["blocked"] for a in t] for t in timed])
    call = slowest([[a["save_call"] for a in t] for t in timed])
    extra = slowest([[a["extra"] for a in t] for t in timed])
    steps = [a["steps"] for a in timed[0]]
    first = max(r["async"][0]["blocked"] for r in ranks)
    base = max(r["base_step"] for r in ranks)
    med = statistics.median
    print(
        f"{datetime.date.today()} | {cpu_model()}, {os.cpu_count()} cores | torch {torch.__version__}\n"
        f"{describe(size)}; FSDP ZeRO-3 on {RANKS} ranks (gloo, fp32, 1 thread each); checkpoint "
        f"{on_disk / 2**20:,.0f} MiB on disk; median of {len(sync)} saves of each kind after a warm-up one\n"
        f"  step time without a save:                  {base:7.2f} s\n"
        f"  sync save, step blocked:                   {med(sync):7.2f} s   (each: "
        + ", ".join(f"{x:.2f}" for x in sync)
        + ")\n"
        f"  async save, step blocked:                  {med(blocked):7.2f} s   (each: "
        + ", ".join(f"{x:.2f}" for x in blocked)
        + f"; of it the save call {med(call):.2f} s)\n"
        f"  async first save (allocates the copy):     {first:7.2f} s\n"
        f"  extra step time while a write is in flight: {med(extra):6.2f} s in all, over {med(steps):.0f} step(s)"
        f" ({med(extra) / max(med(steps), 1):.2f} s per step)\n"
        f"  async blocked / sync save:                 {med(blocked) / med(sync):7.1%}   (target <= 25%)"
    )


if __name__ == "__main__":
    main()
