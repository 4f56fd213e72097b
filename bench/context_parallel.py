"""Context parallelism's memory: the activations a rank holds at a fixed sequence length as cp grows, and the longest
sequence whose training step fits a memory budget per rank at cp = 1, 2 and 4.

Each cp degree is one torchrun job of cp ranks (gloo on CPU, fp32, one thread per rank; dp = 1, fsdp ZeRO-3 over the
cp ranks, as `trainer train` builds it). A rank builds the model with `trainer.build.build_model` and measures one
training step with `trainer.plan.measure.measure_step`: the most bytes saved for backward alive at once
(`activations`) and the peak of live tensors (`peak`, PyTorch's MemTracker), the largest over the ranks. The longest
sequence that fits is searched in the job (doubling, then halving the step, to a multiple of 512 tokens): every rank
measures the same lengths and takes the same decisions.

    python bench/context_parallel.py                       # Llama, 4 x 256, about 10 minutes on 2 cores
    python bench/context_parallel.py --seq 8192 --budget-mib 320
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARK = "CP_BENCH "
MODEL = {"arch": "llama", "n_layer": 4, "n_head": 4, "n_kv_heads": 2, "d_model": 256, "vocab_size": 2048}
GRANULE = 512  # sequence lengths searched in multiples of this (divisible by 2 x cp for cp <= 4... and 256)
MAX_SEQ = 1 << 16


def config_of(cp: int, seq: int):
    from trainer.config import load_config

    return load_config(
        None,
        [
            "data.train=unused",
            "data.tokenizer=unused",
            f"data.seq_len={seq}",
            "train.micro_batch=1",
            *(f"model.{k}={v}" for k, v in MODEL.items()),
            f"model.max_seq_len={MAX_SEQ}",
            "parallel.engine=fsdp",
            "parallel.zero_stage=3",
            f"parallel.cp={cp}",
            "log.wandb.mode=disabled",
        ],
    )


def predicted(cp: int, seq: int):
    """`trainer plan`'s formula for the same layout (a `trainer.plan.memory.Breakdown`)."""
    from trainer.build import resolve_model
    from trainer.plan.memory import Layout, estimate

    cfg = config_of(cp, seq)
    model_cfg = resolve_model(cfg, SimpleNamespace(vocab_size=MODEL["vocab_size"], eos_id=0))
    return estimate(model_cfg, Layout.from_config(cfg, cp), seq)


def measure(cp: int, seq: int) -> dict:
    """One training step of sequence `seq` at context-parallel degree `cp`: the largest figures over the ranks."""
    import torch
    import torch.distributed as dist

    from trainer.build import build_model, resolve_model
    from trainer.parallel import init_distributed
    from trainer.plan.measure import measure_step

    cfg = config_of(cp, seq)
    tok = SimpleNamespace(vocab_size=MODEL["vocab_size"], eos_id=0)
    model_cfg = resolve_model(cfg, tok)
    dims, device = init_distributed(1, need_group=True, cp=cp)
    engine, _ = build_model(cfg, dims, device, model_cfg)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, MODEL["vocab_size"], (1, seq + 1), generator=gen)
    measured = measure_step(engine, [{"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}])
    every = [None] * dims.world_size
    dist.all_gather_object(every, measured)
    del engine
    gc.collect()
    dist.barrier()
    return {k: max(m[k] for m in every) for k in ("activations", "peak")}


def worker(cp: int, seq: int, budget: int) -> None:
    """One cp degree: the figures at `seq`, then the longest multiple of GRANULE whose peak fits `budget` bytes."""
    import torch

    torch.set_num_threads(1)
    out = {"cp": cp, "at_seq": measure(cp, seq)}
    fits, too_big, probe = 0, None, GRANULE * 2
    while too_big is None or too_big - fits > GRANULE:
        if probe * 2 > MAX_SEQ and too_big is None:
            break
        peak = measure(cp, probe)["peak"]
        if peak <= budget:
            fits = probe
        else:
            too_big = probe
        probe = probe * 2 if too_big is None else (fits + too_big) // 2 // GRANULE * GRANULE
        if probe in (fits, too_big):
            break
    out["longest"] = fits
    if int(os.environ.get("RANK", "0")) == 0:
        print(MARK + json.dumps(out), flush=True)


def run(cp: int, seq: int, budget: int, timeout: int = 3000) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}"]
    cmd += [str(Path(__file__).resolve()), "--worker", str(cp), "--seq", str(seq), "--budget-mib", str(budget >> 20)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    got = [json.loads(x[len(MARK) :]) for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if proc.returncode != 0 or not got:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"context-parallel bench worker failed (exit {proc.returncode}) at cp={cp}")
    return got[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=8192, help="the fixed sequence length of the first table")
    ap.add_argument("--budget-mib", type=int, default=512, help="memory per rank the longest sequence must fit")
    ap.add_argument("--cp", default="1,2,4", help="context-parallel degrees")
    args = ap.parse_args()
    budget = args.budget_mib << 20
    if args.worker:
        worker(args.worker, args.seq, budget)
        return
    m = MODEL
    print(
        f"context parallelism, {datetime.date.today()}, {os.cpu_count()} CPU cores, gloo, fp32: Llama "
        f"{m['n_layer']} x {m['d_model']} (GQA {m['n_head']}/{m['n_kv_heads']} heads, vocab {m['vocab_size']}), "
        f"micro-batch 1, fsdp ZeRO-3 over the cp ranks; figures are the largest over the ranks",
        flush=True,
    )
    results = [run(int(c), args.seq, budget) for c in args.cp.split(",")]
    base = results[0]["at_seq"]
    print(f"\nat {args.seq} tokens per sequence (formula: `trainer plan`'s prediction for the same layout):")
    print(
        f"{'cp':>3} {'activations MiB':>16} {'vs cp=1':>8} {'formula':>8} {'peak MiB':>10} {'vs cp=1':>8} {'formula':>8}"
    )
    for r in results:
        a, p = r["at_seq"]["activations"], r["at_seq"]["peak"]
        est = predicted(r["cp"], args.seq)
        print(
            f"{r['cp']:>3} {a / 2**20:>16,.1f} {a / base['activations']:>8.2f} {est.activations / a - 1:>+8.1%} "
            f"{p / 2**20:>10,.1f} {p / base['peak']:>8.2f} {est.peak / p - 1:>+8.1%}"
        )
    print(f"\nlongest sequence whose step peaks within {args.budget_mib} MiB per rank (multiples of {GRANULE}):")
    for r in results:
        print(f"{r['cp']:>3} {r['longest']:>8,} tokens  {r['longest'] / max(results[0]['longest'], 1):>5.2f}x cp=1")


if __name__ == "__main__":
    main()
