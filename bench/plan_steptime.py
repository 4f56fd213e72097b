"""The step-time model of `trainer plan` against measured steps, on this machine: the CPU's measured matmul rate as
the "GPU" peak (efficiency 1) and gloo's measured all-reduce bandwidth as every link, then the model's predicted
step time beside the median of real steps for each CPU layout of the parity table (2 ranks, one thread each).

    python bench/plan_steptime.py      # about 2 minutes on 2 cores

No test asserts a time: the figures go in docs/benchmarks.md. The model is deliberately simple (see trainer/plan/cost.py):
it knows matmul FLOPs and bytes on links, not the element-wise kernels, Python overhead or gloo's latency that
dominate a small model on CPU, so it is expected to be optimistic here.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MARK = "PLAN_STEPTIME "
SIZE = {"n_layer": 4, "n_head": 8, "d_model": 512, "vocab_size": 8192, "seq": 256, "micro_batch": 4}
LAYOUTS = {
    "ddp": ["parallel.engine=ddp"],
    "fsdp ZeRO-2": ["parallel.engine=fsdp", "parallel.zero_stage=2"],
    "fsdp ZeRO-3": ["parallel.engine=fsdp", "parallel.zero_stage=3"],
    "deepspeed ZeRO-2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "tp 2": ["parallel.engine=ddp", "parallel.tp=2"],
    "pp 2, 1f1b x4": ["parallel.engine=ddp", "parallel.pp=2", "train.grad_accum=4"],
    "fsdp ZeRO-3, AC full": ["parallel.engine=fsdp", "parallel.zero_stage=3", "train.activation_checkpointing=full"],
}
STEPS = 4


def probe() -> dict:
    """One rank: fp32 matmul FLOP/s on one thread; then (2 ranks) gloo all-reduce bus bandwidth of 32 MB."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(8):
        a @ b
    flops = 8 * 2 * 1024**3 / (time.perf_counter() - t)
    x = torch.ones(8 * 2**20)
    dist.all_reduce(x)
    t = time.perf_counter()
    for _ in range(4):
        dist.all_reduce(x)
    seconds = (time.perf_counter() - t) / 4
    n = dist.get_world_size()
    bw = 2 * (n - 1) / n * x.numel() * 4 / seconds  # the ring's bytes per rank, over the time
    return {"flops": flops, "bw": bw}


def worker(names: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from plan_accuracy import config_of

    from trainer.build import build_model, check_layout, engine_config, pipeline_plan, resolve_model
    from trainer.parallel import init_distributed

    torch.set_num_threads(1)
    init_distributed(1, need_group=True)
    spec = probe()
    for name in names:
        cfg = config_of("gpt", LAYOUTS[name], SIZE)
        p = cfg.parallel
        tok = SimpleNamespace(vocab_size=SIZE["vocab_size"], eos_id=0)
        model_cfg = resolve_model(cfg, tok)
        ds_config, plan = engine_config(cfg, model_cfg), pipeline_plan(cfg, model_cfg)
        dims, device = init_distributed(p.tp, need_group=True, pp=p.pp)
        check_layout(cfg, dims, model_cfg)
        engine, _ = build_model(cfg, dims, device, model_cfg, ds_config, pipeline=plan)
        gen = torch.Generator().manual_seed(dims.dp_rank)
        batches = []
        for _ in range(cfg.train.grad_accum):
            ids = torch.randint(0, SIZE["vocab_size"], (SIZE["micro_batch"], SIZE["seq"] + 1), generator=gen)
            batches.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
        times = []
        for i in range(STEPS + 1):
            dist.barrier()
            t = time.perf_counter()
            engine.train_step(batches)
            engine.step(1e-4)
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t)
        if dims.is_main:
            print(MARK + json.dumps({"layout": name, "step_s": statistics.median(times), **spec}), flush=True)
        del engine


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2].split("|"))
        os._exit(0)
    from plan_accuracy import config_of

    from trainer.build import resolve_model
    from trainer.plan.cost import step_cost
    from trainer.plan.hardware import Accelerator
    from trainer.plan.memory import Layout

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        __file__,
        "--worker",
        "|".join(LAYOUTS),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=REPO, check=False)
    rows = [json.loads(x[len(MARK) :]) for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if proc.returncode or len(rows) != len(LAYOUTS):
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit("step-time worker failed")
    flops, bw = rows[0]["flops"], rows[0]["bw"]
    cpu = Accelerator("cpu", 2**40, flops, bw, bw, gpus_per_node=2)
    print(
        f"{datetime.date.today()} | torch, 2 gloo ranks x 1 thread | GPT {SIZE['n_layer']} x {SIZE['d_model']}, "
        f"vocab {SIZE['vocab_size']}, seq {SIZE['seq']}, micro-batch {SIZE['micro_batch']}, fp32 | measured: "
        f"{flops / 1e9:.1f} GFLOP/s per rank (1024^3 fp32 matmul), gloo {bw / 1e9:.2f} GB/s (32 MB all-reduce)"
    )
    print(f"{'layout':<24} {'measured s':>10} {'predicted s':>11} {'error':>7}")
    errs = []
    for r in rows:
        cfg = config_of("gpt", LAYOUTS[r["layout"]], SIZE)
        model_cfg = resolve_model(cfg, SimpleNamespace(vocab_size=SIZE["vocab_size"], eos_id=0))
        predicted = step_cost(model_cfg, Layout.from_config(cfg, 2), SIZE["seq"], cpu, efficiency=1.0).step_s
        err = predicted / r["step_s"] - 1
        errs.append(abs(err))
        print(f"{r['layout']:<24} {r['step_s']:>10.3f} {predicted:>11.3f} {err:>+7.0%}")
    print(f"mean |error| {statistics.mean(errs):.0%}")


if __name__ == "__main__":
    main()
