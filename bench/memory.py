"""Memory benchmark: model-state bytes per rank under ddp, fsdp ZeRO-2 and ZeRO-3, and the activations activation
checkpointing saves, each measured beside its alternatives in one run.

1. Model state on 2 ranks (gloo, CPU, fp32, one thread per rank), each layout in a fresh `torch.distributed.run`
   job: the bytes of the tensors a rank holds (parameters, gradients right after backward, AdamW state after the
   first step; DTensors by their local shard, each storage counted once, so FSDP's shard padding is included) beside
   the engine's own figure (`layout()["model_state_bytes"]`) and the textbook formula (16 B/param for ddp,
   (4 + 12/dp) B/param at ZeRO-2, 16/dp B/param at ZeRO-3); the process's peak RSS and the median step time.
2. Activation checkpointing (one process, fp32) at a long sequence: the bytes of the tensors autograd saves for
   backward during the forward and the loss (recorded by `torch.autograd.graph.saved_tensors_hooks`, parameters
   left out, each storage counted once), split into those saved inside the transformer blocks and outside them
   (embeddings, final norm, LM head, loss; under full checkpointing the head and loss run in checkpointed chunks,
   so only their inputs are saved); peak RSS and median step time, each mode in a fresh process.

    python bench/memory.py            # the sizes below; a few minutes on 2 cores
    python bench/memory.py --quick    # tiny dims: checks the script works in well under a minute

It ends with one line per target: ZeRO-3 model state <= 0.55x ddp's, full checkpointing saves >= 3x less.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.build import build_model, check_layout, engine_config, resolve_model
from trainer.config import load_config
from trainer.engines.deepspeed import import_deepspeed
from trainer.models import count_params, model_from_config, resolve_model_config
from trainer.parallel import init_distributed, shutdown_distributed

MARK = "MEMORY_BENCH_RESULT "  # prefixes the JSON line a worker prints for the parent
RANKS = 2
MMAP_THRESHOLD = 65536  # bytes: glibc malloc serves larger blocks by mmap and unmaps them when freed (see launch)
MiB = 2**20

# Model state: a ~83M-parameter GPT (8 x 768, vocab 32768, tied head); short sequences, so activations stay small.
# Checkpointing: a small GPT at a long sequence, so activations dominate; vocab 8192 keeps the logits (saved outside
# the blocks, by the loss) from swamping what the blocks save.
SIZES = {
    "full": {
        "state": {"n_layer": 8, "n_head": 12, "d_model": 768, "vocab_size": 32768, "seq": 128, "micro_batch": 1},
        "act": {"n_layer": 4, "n_head": 4, "d_model": 256, "vocab_size": 8192, "seq": 1024, "micro_batch": 2},
    },
    "quick": {
        "state": {"n_layer": 2, "n_head": 4, "d_model": 128, "vocab_size": 2048, "seq": 64, "micro_batch": 1},
        "act": {"n_layer": 2, "n_head": 4, "d_model": 128, "vocab_size": 1024, "seq": 256, "micro_batch": 2},
    },
}
LAYOUTS = {
    "ddp": ["parallel.engine=ddp"],
    "zero2": ["parallel.engine=fsdp", "parallel.zero_stage=2"],
    "zero3": ["parallel.engine=fsdp", "parallel.zero_stage=3"],
    "ds1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "ds2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "ds3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "ds3_off": ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.offload=cpu"],
}
AC_MODES = ("none", "selective", "full")


# ----------------------------------------------------------------------------------------------------- measuring


def storage_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of the storages behind `tensors` (DTensors: their local shard), each storage counted once."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):  # None, or a step count kept as a number
            continue
        s = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(size: dict, overrides: list[str], need_group: bool):
    """Config, ranks and engine as `trainer train` builds them (no tokenizer: a stand-in gives the vocabulary)."""
    cfg = load_config(
        None,
        [
            f"data.train={REPO / 'data' / 'shakespeare' / 'train.txt'}",
            "data.tokenizer=unused",  # build_model reads neither the corpus nor the tokenizer
            f"data.seq_len={size['seq']}",
            f"train.micro_batch={size['micro_batch']}",
            "train.lr=1e-4",
            "model.arch=gpt",
            *(f"model.{k}={size[k]}" for k in ("n_layer", "n_head", "d_model", "vocab_size")),
            f"model.max_seq_len={size['seq']}",
            "log.wandb.mode=disabled",
            *overrides,
        ],
    )
    p = cfg.parallel
    model_cfg = resolve_model(cfg, SimpleNamespace(vocab_size=size["vocab_size"], eos_id=0))
    ds_config = engine_config(cfg, model_cfg)
    dims, device = init_distributed(p.tp, need_group=need_group or p.engine != "ddp", timeout_s=p.timeout_s)
    check_layout(cfg, dims, model_cfg)
    engine, counts = build_model(cfg, dims, device, model_cfg, ds_config)
    engine.train()
    return dims, engine, counts


def run_steps(
    engine, size: dict, dp: int, steps: int, *, forward_ctx=nullcontext, after_forward=None, after_backward=None
):
    """Warm-up step (measured through the callbacks) then `steps` timed steps; returns their times."""
    gen = torch.Generator().manual_seed(0)
    mb, seq = size["micro_batch"], size["seq"]
    times = []
    for i in range(steps + 1):
        ids = torch.randint(0, size["vocab_size"], (mb, seq + 1), generator=gen)
        t0 = time.perf_counter()
        with engine.micro_batch(last=True):
            with forward_ctx() if i == 0 else nullcontext():
                loss = engine.forward(ids[:, :-1], ids[:, 1:])  # the model's own loss, as the trainer computes it
            if i == 0 and after_forward:
                after_forward()
            engine.backward(loss / (mb * seq * dp))
            del loss
        if i == 0 and after_backward:
            after_backward()
        engine.step(1e-4)
        if i > 0:
            times.append(time.perf_counter() - t0)
    return times


def state_worker(layout: str, size: dict, steps: int) -> None:
    """One rank of a 2-rank job: model-state bytes, gathered-parameter bytes, RSS growth, peak RSS and step times."""
    torch.set_num_threads(1)
    if layout.startswith("ds"):
        import_deepspeed()  # the library's own memory is not model state
    rss_base = current_rss()
    dims, engine, counts = build(size, LAYOUTS[layout], need_group=True)
    lay = engine.layout()
    figures = {"n_params": counts["n_params"], "layout_bytes": lay["model_state_bytes"]}
    figures["layout_offload"] = lay.get("offload_bytes", 0)
    model = engine.module
    if engine.name == "deepspeed":
        # Parameters as this rank holds them (ZeRO-3: its partitions, plus the small ones DeepSpeed keeps whole);
        # fp32 master weights and AdamW state are the wrapped optimizer's. DeepSpeed's gradient buffers are its own
        # internals: they show in the RSS growth only.
        params = [getattr(p, "ds_tensor", None) for p in model.parameters()] + [p.data for p in model.parameters()]
        figures["params"] = storage_bytes(params)
        base = engine.ds.optimizer.optimizer
        master = [p for g in base.param_groups for p in g["params"]]
    else:
        # The optimizer holds what persists between steps: the whole parameters under ddp, the sharded ones (fsdp).
        params = list(dict.fromkeys(p for g in engine.optimizer.param_groups for p in g["params"]))
        figures["params"] = storage_bytes(params)
        base, master = engine.optimizer, []

    def after_forward() -> None:
        # Parameters FSDP holds unsharded (plain tensors, registered in place of the DTensor shards) after the
        # forward, until their block's backward: all of them at ZeRO-2; none at ZeRO-3, where each block (and the
        # root) is gathered again, one or two at a time, in its backward (not counted here). DDP gathers nothing: its
        # whole parameters are already in `params`.
        gathered = [p for p in model.parameters() if not isinstance(p, DTensor)] if engine.name == "fsdp" else []
        figures["gathered"] = storage_bytes(gathered)

    def after_backward() -> None:
        if engine.name != "deepspeed":
            figures["grads"] = storage_bytes([p.grad for p in params])  # before step() zeroes them

    times = run_steps(engine, size, dims.dp, steps, after_forward=after_forward, after_backward=after_backward)
    seen = set()
    figures["optim"] = storage_bytes(master, seen) + sum(storage_bytes(st.values(), seen) for st in base.state.values())
    figures["step_s"] = statistics.median(times)
    figures["rss_growth"] = current_rss() - rss_base  # what the engine keeps between steps, buffers included
    figures["rss_peak"] = peak_rss()
    every = [None] * dims.world_size
    dist.all_gather_object(every, figures)
    if dims.is_main:
        print(MARK + json.dumps({"layout": layout, "dp": dims.dp, "ranks": every}), flush=True)
    shutdown_distributed()


def act_worker(mode: str, size: dict, steps: int) -> None:
    """One process: bytes saved for backward (inside / outside the blocks), peak RSS and step times."""
    torch.set_num_threads(1)
    dims, engine, counts = build(size, [f"train.activation_checkpointing={mode}"], need_group=False)
    model = engine.module
    saved = {"blocks": 0, "outside": 0}
    region = ["outside"]
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights saved by matmuls are not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Under non-reentrant checkpointing the checkpointed block's own saves go to checkpoint's inner hooks
        # (they are recomputed in backward): only its inputs, saved by the checkpoint itself, reach this one.
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            saved[region[0]] += s.nbytes()
        return t

    for block in model.blocks.values():  # the checkpoint wrappers where blocks are checkpointed
        block.register_forward_pre_hook(lambda *_: region.__setitem__(0, "blocks"))
        block.register_forward_hook(lambda *_: region.__setitem__(0, "outside"))

    rss_before = current_rss()
    times = run_steps(
        engine, size, dims.dp, steps, forward_ctx=lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    )
    figures = {"mode": mode, "n_params": counts["n_params"], **saved, "rss_before": rss_before}
    figures.update(rss_peak=peak_rss(), step_s=statistics.median(times))
    print(MARK + json.dumps(figures), flush=True)
    shutdown_distributed()


# ------------------------------------------------------------------------------------------------------ reporting


def launch(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # glibc raises its mmap threshold after the first large free and then keeps freed blocks in the heap: FSDP's
    # all-gather / reduce-scatter buffers would stay in the RSS once freed (at ZeRO-3 the peak RSS came out above
    # ddp's). A fixed threshold hands large blocks back to the OS when freed, so peak RSS follows live memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1][len(MARK) :])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def n_params(size: dict) -> int:
    with torch.device("meta"):
        dims = {k: size[k] for k in ("n_layer", "n_head", "d_model", "vocab_size")}
        return count_params(model_from_config(resolve_model_config("gpt", None, max_seq_len=size["seq"], **dims)))


def describe(size: dict) -> str:
    return (
        f"GPT {size['n_layer']} x {size['d_model']}, {size['n_head']} heads, vocab {size['vocab_size']}, "
        f"{n_params(size) / 1e6:.1f}M params, seq {size['seq']}, micro_batch {size['micro_batch']}"
    )


def mib(b: float) -> str:
    return f"{b / MiB:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny dims: a fast check that the script works")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step (default 3)")
    p.add_argument("--only", choices=("state", "act"), help="run one of the two tables")
    p.add_argument("--worker", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--act-worker", choices=AC_MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    sizes = SIZES["quick" if args.quick else "full"]
    if args.worker:
        state_worker(args.worker, sizes["state"], args.steps)
        # Its figures are printed. Skip interpreter shutdown: the sharded modules keep the gloo group (and its
        # threads) alive past destroy_process_group, and a thread still releasing the last collective's tensors
        # aborts the process when shutdown takes the GIL from it (a quarter of the runs with torch 2.13).
        os._exit(0)
    if args.act_worker:
        return act_worker(args.act_worker, sizes["act"], args.steps)

    passthrough = ["--steps", str(args.steps), *(["--quick"] if args.quick else [])]
    me = str(Path(__file__).resolve())
    print(
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {cpu_model()}, {os.cpu_count()} cores | torch {torch.__version__}"
        f"\nfp32, 1 thread per process, median of {args.steps} steps after a warm-up step, workers run with "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', MMAP_THRESHOLD)}"
    )
    targets = []
    if args.only in (None, "state"):
        size = sizes["state"]
        print(f"\nModel state per rank, {RANKS} ranks (gloo, CPU): {describe(size)}")
        results = {}
        for layout in LAYOUTS:
            print(f"  running {layout} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}"]
            results[layout] = launch([*cmd, me, "--worker", layout, *passthrough])
        n = results["ddp"]["ranks"][0]["n_params"]
        dp = results["ddp"]["dp"]
        formula = {
            "ddp": 16 * n,
            "zero2": (4 + 12 / dp) * n,
            "zero3": 16 * n / dp,
            "ds1": (8 + 12 / dp) * n,
            "ds2": (4 + 16 / dp) * n,
            "ds3": 20 * n / dp,
            "ds3_off": 20 * n / dp,
        }
        print(
            f"{'layout':<7} {'params':>8} {'grads':>8} {'optim':>8} {'state':>8} {'layout()':>14} {'formula':>8} "
            f"{'gathered':>9} {'state+gath':>10} {'RSS growth':>10} {'peak RSS':>9} {'step s':>7}"
        )
        state, peak, growth = {}, {}, {}
        for layout, r in results.items():
            # every figure is the larger of the two ranks' (FSDP's last shard may be padded)
            f = {k: max(rank.get(k, 0) for rank in r["ranks"]) for k in r["ranks"][0] | {"grads": 0, "gathered": 0}}
            measured_grads = layout in ("ddp", "zero2", "zero3")
            state[layout] = f["params"] + f["grads"] + f["optim"]
            peak[layout] = state[layout] + f["gathered"]
            growth[layout] = f["rss_growth"]
            lay = mib(f["layout_bytes"]) + (f"+{mib(f['layout_offload'])}" if f["layout_offload"] else "")
            print(
                f"{layout:<7} {mib(f['params']):>8} {mib(f['grads']) if measured_grads else '-':>8} "
                f"{mib(f['optim']):>8} {mib(state[layout]) if measured_grads else '-':>8} {lay:>14} "
                f"{mib(formula[layout]):>8} {mib(f['gathered']):>9} "
                f"{mib(peak[layout]) if measured_grads else '-':>10} {mib(growth[layout]):>10} "
                f"{mib(f['rss_peak']):>9} {f['step_s']:>7.2f}"
            )
        print(
            "MiB per rank. state = params + grads (after backward) + AdamW state (after the step; DeepSpeed: fp32 "
            "master\nweights too), what persists between steps; gathered = parameters FSDP holds unsharded from "
            "forward to backward\n(measured after the forward): all of them at ZeRO-2; at ZeRO-3 each block is "
            "gathered only while it runs.\nDeepSpeed's gradients live in its own buffers (-): the RSS growth (RSS "
            "after the steps minus before the engine\nwas built, each buffer included) compares every engine. "
            "layout() = engine.layout()['model_state_bytes'] (+ bytes\noffloaded to CPU memory); formula: 16 B/param "
            "ddp, (4 + 12/dp) ZeRO-2, 16/dp ZeRO-3; DeepSpeed keeps fp32 master\nweights beside fp32 parameters: "
            "(8 + 12/dp) ZeRO-1, (4 + 16/dp) ZeRO-2, 20/dp ZeRO-3 (offload: the same bytes,\nin CPU memory). peak "
            "RSS: the whole process, torch (and DeepSpeed) included."
        )
        for layout in results:
            if layout != "ddp":
                print(f"{layout}/ddp: RSS growth {growth[layout] / growth['ddp']:.2f}x", end="")
                print(
                    f", state + gathered {peak[layout] / peak['ddp']:.2f}x"
                    if layout in state and layout in ("zero2", "zero3")
                    else ""
                )
        ratio = peak["zero3"] / peak["ddp"]
        targets.append(
            f"ZeRO-3 model state (with what stays gathered) <= 0.55x ddp's: {'met' if ratio <= 0.55 else 'NOT met'} "
            f"({ratio:.2f}x)"
        )
        ratio = growth["ds3"] / growth["ddp"]
        targets.append(
            f"DeepSpeed ZeRO-3 memory kept between steps (RSS growth) below ddp's: "
            f"{'met' if ratio < 1 else 'NOT met'} ({ratio:.2f}x)"
        )

    if args.only in (None, "act"):
        size = sizes["act"]
        print(f"\nActivation checkpointing, one process: {describe(size)}")
        results = {}
        for mode in AC_MODES:
            print(f"  running checkpointing={mode} ...", file=sys.stderr, flush=True)
            results[mode] = launch([sys.executable, me, "--act-worker", mode, *passthrough])
        print(
            f"{'checkpointing':<13} {'saved':>9} {'in blocks':>10} {'outside':>9} {'RSS before':>11} "
            f"{'peak RSS':>9} {'step s':>7}"
        )
        for mode, r in results.items():
            print(
                f"{mode:<13} {mib(r['blocks'] + r['outside']):>9} {mib(r['blocks']):>10} {mib(r['outside']):>9} "
                f"{mib(r['rss_before']):>11} {mib(r['rss_peak']):>9} {r['step_s']:>7.2f}"
            )
        print(
            "MiB. saved = activations autograd keeps for backward (parameters excluded, each storage once); outside "
            "=\nembeddings, final norm, LM head and loss (the log-softmax of the logits; under full checkpointing "
            "the head\nand loss run in checkpointed chunks of tokens). RSS before = after the model is built, before "
            "the first step."
        )
        none, full = results["none"], results["full"]
        ratio = (none["blocks"] + none["outside"]) / (full["blocks"] + full["outside"])
        print(f"none/full: saved {ratio:.2f}x, saved in blocks {none['blocks'] / max(full['blocks'], 1):.2f}x")
        targets.append(
            f"full checkpointing saves >= 3x less activation memory: {'met' if ratio >= 3 else 'NOT met'} "
            f"({ratio:.2f}x)"
        )

    print()
    for line in targets:
        print("target: " + line)


if __name__ == "__main__":
    main()
