"""The memory formula of `trainer plan` against what a real training step holds, layout by layout.

Each row builds its layout exactly as `trainer train` does (real gloo ranks on CPU, fp32, one thread per rank), runs
a warm-up step, then measures one step with `trainer.plan.measure.measure_step`: per rank the bytes of parameters,
gradients (when backward ends), optimizer state, the most activations saved for backward alive at once, and the
peak of live tensors (PyTorch's MemTracker). Beside it, `trainer.plan.memory.estimate` for the same model and layout,
for that rank's pipeline stage. Under `offload=cpu` both sides count the CPU-resident bytes too (on this CPU machine
they share one memory).

    python bench/plan_accuracy.py           # every row, about 3 minutes on 2 cores
    python bench/plan_accuracy.py --only gpt-ddp-none,gpt-fsdp3-full

tests/test_plan.py runs the same rows and asserts 5% per category and 10% on the peak.
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

MARK = "PLAN_ACCURACY_ROW "
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "peak")
TOLERANCE = {"parameters": 0.05, "gradients": 0.05, "optimizer": 0.05, "activations": 0.05, "peak": 0.10}
SIZE = {"n_layer": 4, "n_head": 4, "d_model": 128, "vocab_size": 2048, "seq": 128, "micro_batch": 2}

LAYOUTS = {  # name -> (ranks, overrides)
    "ddp": (2, ["parallel.engine=ddp"]),
    "fsdp2": (2, ["parallel.engine=fsdp", "parallel.zero_stage=2"]),
    "fsdp3": (2, ["parallel.engine=fsdp", "parallel.zero_stage=3"]),
    "ds1": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    "ds2": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    "ds3": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=3"]),
    "ds2-offload": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.offload=cpu"]),
    "ds3-offload": (2, ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.offload=cpu"]),
    "tp2": (2, ["parallel.engine=ddp", "parallel.tp=2"]),
    "pp2-1f1b-m4": (2, ["parallel.engine=ddp", "parallel.pp=2", "train.grad_accum=4"]),
    "fsdp3xtp2": (4, ["parallel.engine=fsdp", "parallel.zero_stage=3", "parallel.tp=2"]),
}
AC = ("none", "selective", "full")
# a few more: other families, micro-batch accumulation, other schedules, pp x fsdp
EXTRA = {
    "gpt-fsdp3-accum2": ("gpt", 2, ["parallel.engine=fsdp", "parallel.zero_stage=3", "train.grad_accum=2"]),
    "gpt-pp2-gpipe-m2": (
        "gpt",
        2,
        ["parallel.engine=ddp", "parallel.pp=2", "parallel.pp_schedule=gpipe", "train.grad_accum=2"],
    ),
    "gpt-pp2xfsdp3-m4": (
        "gpt",
        4,
        ["parallel.engine=fsdp", "parallel.zero_stage=3", "parallel.pp=2", "train.grad_accum=4"],
    ),
    "llama-fsdp3-none": ("llama", 2, ["parallel.engine=fsdp", "parallel.zero_stage=3"]),
    "llama-fsdp3-selective": (
        "llama",
        2,
        ["parallel.engine=fsdp", "parallel.zero_stage=3", "train.activation_checkpointing=selective"],
    ),
    "llama-tp2-none": ("llama", 2, ["parallel.engine=ddp", "parallel.tp=2"]),
    "llama-ds3-full": (
        "llama",
        2,
        ["parallel.engine=deepspeed", "parallel.zero_stage=3", "train.activation_checkpointing=full"],
    ),
    # context parallelism: a rank's share of the tokens, the gathered keys and values, the shared mask
    "gpt-cp2-ddp-none": ("gpt", 2, ["parallel.engine=ddp", "parallel.cp=2"]),
    "llama-cp2xfsdp3-selective": (
        "llama",
        4,
        ["parallel.engine=fsdp", "parallel.cp=2", "train.activation_checkpointing=selective"],
    ),
    "bert-ddp-none": ("bert", 2, ["parallel.engine=ddp"]),
    "bert-pp2-1f1b-m2": ("bert", 2, ["parallel.engine=ddp", "parallel.pp=2", "train.grad_accum=2"]),
}


def rows() -> dict[str, tuple[str, int, list[str]]]:
    """Every row: name -> (arch, ranks, overrides). GPT under every layout and checkpointing mode, then EXTRA."""
    out = {}
    for name, (ranks, overrides) in LAYOUTS.items():
        for ac in AC:
            out[f"gpt-{name}-{ac}"] = ("gpt", ranks, [*overrides, f"train.activation_checkpointing={ac}"])
    out.update(EXTRA)
    return out


def config_of(arch: str, overrides: list[str], size: dict | None = None):
    from trainer.config import load_config

    size = size or SIZE
    return load_config(
        None,
        [
            "data.train=unused",
            "data.tokenizer=unused",
            f"data.seq_len={size['seq']}",
            f"train.micro_batch={size['micro_batch']}",
            f"model.arch={arch}",
            *(f"model.{k}={size[k]}" for k in ("n_layer", "n_head", "d_model", "vocab_size")),
            f"model.max_seq_len={size['seq']}",
            "log.wandb.mode=disabled",
            *overrides,
        ],
    )


def worker(names: list[str]) -> None:
    """One rank: every named row in turn, in one process group (each row builds its own mesh)."""
    import torch
    import torch.distributed as dist

    from trainer.build import build_model, check_layout, engine_config, pipeline_plan, resolve_model
    from trainer.parallel import init_distributed
    from trainer.plan.measure import measure_step

    torch.set_num_threads(1)
    table = rows()
    if any("parallel.engine=deepspeed" in table[n][2] for n in names):
        from trainer.engines.deepspeed import import_deepspeed

        import_deepspeed()  # before the freeze below, so that its objects are frozen too
    # every row collects garbage before it measures: with the import-time objects frozen out of the collector's view,
    # each collection takes milliseconds instead of a quarter second
    gc.freeze()
    for name in names:
        arch, _, overrides = table[name]
        cfg = config_of(arch, overrides)
        p = cfg.parallel
        tok = SimpleNamespace(vocab_size=SIZE["vocab_size"], eos_id=0, cls_id=1, sep_id=2, mask_id=3)
        model_cfg = resolve_model(cfg, tok)
        ds_config = engine_config(cfg, model_cfg)
        plan = pipeline_plan(cfg, model_cfg)
        dims, device = init_distributed(p.tp, need_group=True, pp=p.pp, cp=p.cp)
        check_layout(cfg, dims, model_cfg)
        engine, _ = build_model(cfg, dims, device, model_cfg, ds_config, pipeline=plan)
        gen = torch.Generator().manual_seed(1000 + dims.dp_rank)
        batches = []
        for _ in range(cfg.train.grad_accum):
            ids = torch.randint(4, SIZE["vocab_size"], (SIZE["micro_batch"], SIZE["seq"] + 1), generator=gen)
            labels = ids[:, 1:].clone()
            if arch == "bert":  # masked LM: a sixth of the positions predicted
                labels[torch.rand(labels.shape, generator=gen) > 0.15] = -100
            batches.append({"input_ids": ids[:, :-1].contiguous(), "labels": labels})
        measured = measure_step(engine, batches)
        every = [None] * dims.world_size
        dist.all_gather_object(every, {"rank": dims.rank, "pp_rank": dims.pp_rank, "measured": measured})
        if dims.is_main:
            print(MARK + json.dumps({"row": name, "ranks": every}), flush=True)
        del engine
        gc.collect()
        dist.barrier()


def run(names: list[str], timeout: int = 1200) -> dict[str, list[dict]]:
    """Runs the rows (one torchrun job per rank count); returns row name -> the ranks' figures."""
    table = rows()
    by_ranks: dict[int, list[str]] = {}
    for name in names:
        by_ranks.setdefault(table[name][1], []).append(name)
    out = {}
    for ranks, group in sorted(by_ranks.items()):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            str(Path(__file__).resolve()),
            "--worker",
            ",".join(group),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
        got = [json.loads(x[len(MARK) :]) for x in proc.stdout.splitlines() if x.startswith(MARK)]
        if proc.returncode != 0 or len(got) != len(group):
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise RuntimeError(f"plan accuracy worker failed (exit {proc.returncode}) on {ranks} ranks")
        out.update({g["row"]: g["ranks"] for g in got})
    return out


def predict(name: str) -> list[dict]:
    """The formula's figures for a row, per pp rank (computed here, in a process that measured nothing)."""
    from trainer.build import resolve_model
    from trainer.plan.memory import Layout, estimate

    arch, ranks, overrides = rows()[name]
    cfg = config_of(arch, overrides)
    tok = SimpleNamespace(vocab_size=SIZE["vocab_size"], eos_id=0, cls_id=1, sep_id=2, mask_id=3)
    est = estimate(resolve_model(cfg, tok), Layout.from_config(cfg, ranks), SIZE["seq"])
    return est.per_pp_rank or [est.as_dict()]


def errors(measured: dict, predicted: dict) -> dict[str, float]:
    """Relative error of the prediction per category on one rank (prediction / measurement - 1)."""
    m, p = measured, predicted
    out = {}
    for cat in CATEGORIES:
        pred = p["peak"] + p["cpu"] if cat == "peak" else p[cat] + p["offloaded"].get(cat, 0)
        out[cat] = pred / m[cat] - 1 if m[cat] else (0.0 if pred == 0 else float("inf"))
    return out


def worst(figures: list[dict], predicted: list[dict]) -> dict[str, float]:
    """The largest error (by magnitude) per category over a row's ranks, each against its pipeline stage's figures."""
    errs = [errors(r["measured"], predicted[r["pp_rank"]]) for r in figures]
    return {cat: max((e[cat] for e in errs), key=abs) for cat in CATEGORIES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated row names")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker.split(","))
        os._exit(0)  # skip interpreter shutdown with live gloo groups (see bench/memory.py)
    names = args.only.split(",") if args.only else list(rows())
    import torch

    print(
        f"{datetime.date.today()} | torch {torch.__version__} | {os.cpu_count()} cores | GPT/Llama/BERT "
        f"{SIZE['n_layer']} x {SIZE['d_model']}, vocab {SIZE['vocab_size']}, seq {SIZE['seq']}, micro-batch "
        f"{SIZE['micro_batch']}, fp32"
    )
    results = run(names)
    print(f"{'row':<28} {'ranks':>5} " + " ".join(f"{c:>11}" for c in CATEGORIES) + "  measured peak MiB")
    worst_all = dict.fromkeys(CATEGORIES, 0.0)
    for name in names:
        w = worst(results[name], predict(name))
        peak = max(r["measured"]["peak"] for r in results[name]) / 2**20
        print(
            f"{name:<28} {len(results[name]):>5} " + " ".join(f"{w[c]:>+11.1%}" for c in CATEGORIES) + f"  {peak:8.1f}"
        )
        for c in CATEGORIES:
            worst_all[c] = max(worst_all[c], abs(w[c]))
    print("largest error: " + ", ".join(f"{c} {worst_all[c]:.1%}" for c in CATEGORIES))


if __name__ == "__main__":
    main()
