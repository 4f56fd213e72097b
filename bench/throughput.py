"""Throughput benchmark: the trainer against the loop a PyTorch user would write instead, in one table.

For each case (a ~16M-parameter GPT at seq 256 x batch 8, and gpt2-small dims at seq 512 x batch 1; fp32, vocab
50304) it alternates, round after round in this one process:

- the trainer as a user runs it for speed: `trainer train` with train.compile, streaming and tokenizing its corpus
  with the default worker, logging every step;
- the peer: transformers' GPT2LMHeadModel with torch.compile over model and loss, in a plain AdamW loop on token ids
  already in memory (no clipping, no logging);
- the bare loop: the project's own model with the same compile setting, forward + loss + backward + clip + AdamW on
  ids in memory (what the trainer adds on top of it is its overhead).

The trainer overhead is measured inside one live trainer run: windows of the trainer's own loop (`train_loop`,
streaming, logging every step) alternate with windows of the bare loop on the same model and optimizer, seconds
apart. Fresh trainer runs against loops measured before and after them read it only to within several points (their
rounds spread from -5% to +9% at gpt2-small dims as the machine drifts): that figure is printed too, not judged.

Figures are ratios of tokens/s measured side by side (medians over rounds): this machine's absolute speed drifts by
10% or more between runs. Each trainer run is compared with the mean of each loop measured just before and just
after it (the loops alternate their order: P B T B P T P B T ...), which cancels a steady drift over the round; a
first trainer run on a cold inductor cache gives the compile start-up and is not compared. It also checks the MFU the trainer logs against one computed here independently (tokens/s
from the step records' wall-clock stamps, 6N + 12 L d T FLOPs per token counted on transformers' model, and a peak
measured here), the data-loader wait, compile start-up (cold inductor cache, then warm), and data-parallel scaling:
2 ranks x 1 thread against 1 rank x 1 thread, each a `trainer train` under torchrun.

    python bench/throughput.py                     # everything (over 30 minutes on 2 cores)
    python bench/throughput.py --only 16M --rounds 2 --no-scaling
    python bench/throughput.py --profile 16M      # torch.profiler table of the step

transformers is needed here only (the dev extra); the package never imports it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# A cold inductor cache, so the first compile is what a new user waits for (later rounds and ranks reuse it).
_CACHE = tempfile.mkdtemp(prefix="bench-inductor-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _CACHE)

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer import loop as loop_module
from trainer import metrics
from trainer import train as train_module
from trainer.config import load_config
from trainer.models import build_model
from trainer.optim import OptimizerSettings, build_optimizer
from trainer.parallel.parallelize import apply_compile
from trainer.tokenizer import train_tokenizer
from trainer.train import train

CORPUS = REPO / "data" / "shakespeare" / "train.txt"
VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does; the same in every loop

# name: (model dims, seq_len, micro_batch, trainer steps per round, of which warm-up, loop steps per round). Warm-up
# steps are left out of the figures: compile, and at 16M the first blocks of all 64 streams, which the first 8 steps
# need (64 x 128 windows tokenized for 64 samples: start-up, reported apart).
CASES = {
    "16M": ({"n_layer": 4, "n_head": 4, "d_model": 256, "d_ff": 1024}, 256, 8, 16, 8, 6),
    "gpt2-small": ({"n_layer": 12, "n_head": 12, "d_model": 768, "d_ff": 3072}, 512, 1, 10, 3, 5),
    # Llama-style at the 16M case's width: GQA (4 query heads over 2 key/value heads), SwiGLU 704, untied head
    "llama-16M": ({"n_layer": 4, "n_head": 4, "n_kv_heads": 2, "d_model": 256, "d_ff": 704}, 256, 8, 16, 8, 6),
}


def arch_of(dims: dict) -> str:
    return "llama" if "n_kv_heads" in dims else "gpt"


SETTINGS = OptimizerSettings(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def matmul_peak(size: int = 2048, trials: int = 10) -> float:
    """FLOP/s of the best of `trials` square fp32 matmuls on all this process's threads (independent of
    trainer.metrics, measured the way the issue asks: a large fp32 matmul, best of several)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):  # warm-up: threads, pages
        torch.mm(a, b)
    best = math.inf
    for _ in range(trials):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


class TransformersLoop:
    """transformers' GPT2LMHeadModel (LlamaForCausalLM for a Llama case), model and loss under one torch.compile,
    plain AdamW: the peer to beat."""

    def __init__(self, dims: dict, seq_len: int, batch: int) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        if arch_of(dims) == "llama":
            llama = LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=dims["d_model"],
                intermediate_size=dims["d_ff"],
                num_hidden_layers=dims["n_layer"],
                num_attention_heads=dims["n_head"],
                num_key_value_heads=dims["n_kv_heads"],
                max_position_embeddings=seq_len,
            )
            self.model = LlamaForCausalLM(llama)
        else:
            gpt2 = GPT2Config(
                vocab_size=VOCAB,
                n_positions=seq_len,
                n_embd=dims["d_model"],
                n_layer=dims["n_layer"],
                n_head=dims["n_head"],
                n_inner=dims["d_ff"],
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
            self.model = GPT2LMHeadModel(gpt2)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)

        def loss_fn(x, y):
            return F.cross_entropy(self.model(input_ids=x).logits.flatten(0, 1), y.flatten())

        self.loss = torch.compile(loss_fn)
        self.ids = torch.randint(0, VOCAB, (batch, seq_len + 1))

    def flops_per_token(self, seq_len: int) -> float:
        """6N + 12 L d T, N = every parameter but the lookup tables: GPT-2's positions (its tied head counted once),
        Llama's token embedding (its untied head is a weight of its own)."""
        cfg = self.model.config
        table = getattr(self.model, "transformer", None)
        lookup = table.wpe.weight if table is not None else self.model.get_input_embeddings().weight
        n = sum(p.numel() for p in self.model.parameters()) - lookup.numel()
        return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len

    def step(self) -> None:
        x, y = self.ids[:, :-1], self.ids[:, 1:]
        self.loss(x, y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class BareLoop:
    """The project's model with the trainer's compile setting (blocks and output), AdamW as the trainer builds it,
    clipping at 1.0: forward, loss, backward, step on ids in memory; nothing else. `model` and `opt`: step these (a
    live trainer run's) instead of building a model."""

    def __init__(self, dims: dict, seq_len: int, batch: int, model=None, opt=None) -> None:
        torch.manual_seed(0)
        if model is None:
            model = build_model(arch_of(dims), None, vocab_size=VOCAB, max_seq_len=seq_len, **dims)
            apply_compile(model, output=True)
        self.model, self.opt = model, opt or build_optimizer(model, SETTINGS)
        self.ids = torch.randint(0, VOCAB, (batch, seq_len + 1))

    def step(self) -> None:
        x, y = self.ids[:, :-1], self.ids[:, 1:]
        self.opt.grad_scale = self.opt.found_inf = None  # a trainer's step leaves its clip factor for fused AdamW there
        (self.model(x, y) / y.numel()).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(loop, steps: int) -> float:
    """Tokens/s of `steps` steps of a loop."""
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.step()
    return steps * loop.ids[:, 1:].numel() / (time.perf_counter() - t0)


def settled(loop, steps: int) -> float:
    """Tokens/s of `steps` steps of a loop after one unmeasured step: the first step after another loop or a trainer
    run meets caches and memory the other one used, and the trainer's own window leaves out its first steps too."""
    loop.step()
    return timed(loop, steps)


def trainer_config(work: Path, tokenizer: Path, dims: dict, seq_len: int, batch: int, steps: int) -> dict:
    return {
        "run": {"name": "bench", "dir": str(work), "seed": 0},
        "model": {"arch": arch_of(dims), "vocab_size": VOCAB, "max_seq_len": seq_len, **dims},
        "data": {"train": [str(CORPUS)], "format": "text", "tokenizer": str(tokenizer), "seq_len": seq_len},
        "train": {"steps": steps, "micro_batch": batch, "warmup_steps": 1, "eval_every": 0, "compile": True},
        "checkpoint": {"every": 0, "keep": 1, "resume": "never"},
        "log": {"every": 1, "wandb": {"mode": "disabled"}},
    }


def read_run(work: Path, t_call: float, warmup: int) -> dict:
    """The trainer's figures after `warmup` steps: tokens/s from the step records' wall-clock stamps (independent of
    what it logs), the MFU and data wait it logged, and its start-up (call to the end of step 1)."""
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    start = lines[0]
    steps = [m for m in lines if "tokens_per_s" in m]
    a, b = steps[warmup - 1], steps[-1]
    measured = steps[warmup:]
    tokens = b["tokens"] - a["tokens"]
    return {
        "tokens_per_s": tokens / (b["time"] - a["time"]),
        # the rate over the whole window (each step's MFU weighted by its time), as the stamps measure it
        "logged_mfu": sum(m["mfu"] * m["step_time_s"] for m in measured) / sum(m["step_time_s"] for m in measured),
        "data_wait": sum(m["data_wait_s"] for m in measured) / sum(m["step_time_s"] for m in measured),
        "startup_s": steps[0]["time"] - t_call,
        "warmup_data_wait": sum(m["data_wait_s"] for m in steps[1:warmup]),
        "step_s": statistics.fmean(m["step_time_s"] for m in measured),
        "peak": start["peak_flops"],
    }


def run_case(name: str, tmp: Path, tokenizer: Path, rounds: int) -> dict:
    """Trainer runs bracketed by the two loops, which alternate their order: P B T1 B P T2 P B T3 B P. Each trainer
    run is compared with the mean of the loop measured just before it and just after it, which cancels a steady
    drift of the machine's speed (10-25% within minutes here) over the round."""
    dims, seq_len, batch, trainer_steps, warmup, loop_steps = CASES[name]
    peer, bare = TransformersLoop(dims, seq_len, batch), BareLoop(dims, seq_len, batch)
    results: dict[str, list] = {"trainer": [], "peer": [], "bare": []}
    peer_flops = peer.flops_per_token(seq_len)

    def run_trainer(tag: str) -> dict:
        work, cfg_path = tmp / f"{name}-{tag}", tmp / f"{name}-{tag}.yaml"
        cfg_path.write_text(yaml.safe_dump(trainer_config(work, tokenizer, dims, seq_len, batch, trainer_steps)))
        t_call = time.time()
        train(load_config(cfg_path))
        shutil.rmtree(work / "checkpoints")  # the final checkpoint: 1.5 GB at gpt2-small, not read here
        return read_run(work, t_call, warmup)

    # first, the trainer on a cold inductor cache: its start-up is what a new user waits for (the bare loop compiles
    # the same graphs, so this must come before it); its speed is not compared
    cold = run_trainer("cold")
    for loop in (peer, bare):  # the loops compile (and warm up) once
        timed(loop, 2)
    measured = {"peer": [settled(peer, loop_steps)], "bare": [settled(bare, loop_steps)]}
    for r in range(rounds):
        # measured just before the trainer measures its own, seconds apart: the machine's speed drifts by 10-25%
        # within a run, so a peak taken at another time would compare two different machines
        peak = matmul_peak()
        metrics._measured_peak_cache.clear()  # the trainer measures its peak once per process: make it measure again
        results["trainer"].append(run_trainer(str(r)))
        results["trainer"][-1]["independent_mfu"] = results["trainer"][-1]["tokens_per_s"] * peer_flops / peak
        results["trainer"][-1]["bench_peak"] = peak
        for key, loop in [("bare", bare), ("peer", peer)][:: 1 if r % 2 == 0 else -1]:
            measured[key].append(settled(loop, loop_steps))
        for key in ("peer", "bare"):
            results[key].append(statistics.fmean(measured[key][-2:]))
        print(
            f"  {name} round {r + 1}/{rounds}: trainer {results['trainer'][-1]['tokens_per_s']:,.0f}, "
            f"transformers+compile {results['peer'][-1]:,.0f}, bare {results['bare'][-1]:,.0f} tokens/s "
            f"(loops: mean of the runs before and after the trainer's)",
            flush=True,
        )
    tr = results["trainer"]
    vs_peer = [t["tokens_per_s"] / p for t, p in zip(tr, results["peer"])]
    vs_bare = [t["tokens_per_s"] / b for t, b in zip(tr, results["bare"])]
    return {
        "vs_peer": statistics.median(vs_peer),
        "vs_bare": statistics.median(vs_bare),
        "trainer_tokens_per_s": statistics.median(t["tokens_per_s"] for t in tr),
        "peer_tokens_per_s": statistics.median(results["peer"]),
        "flops_per_token": peer_flops,
        "logged_mfu": statistics.median(t["logged_mfu"] for t in tr),
        "data_wait": statistics.median(t["data_wait"] for t in tr),
        "startup_cold_s": cold["startup_s"],
        "warmup_data_wait": statistics.median(t["warmup_data_wait"] for t in tr),
        "startup_warm_s": statistics.median(t["startup_s"] for t in tr),
        "vs_bare_rounds": vs_bare,
        "vs_peer_rounds": vs_peer,
        "step_s": statistics.median(t["step_s"] for t in tr),
        "trainer_peak": statistics.median(t["peak"] for t in tr),
        "peak": statistics.median(t["bench_peak"] for t in tr),
        "independent_mfu": statistics.median(t["independent_mfu"] for t in tr),
        "mfu_diff": statistics.median(abs(t["logged_mfu"] - t["independent_mfu"]) for t in tr),
    }


def in_run_overhead(name: str, tmp: Path, tokenizer: Path, rounds: int = 6, steps: int = 4) -> dict:
    """The trainer's loop against the bare loop on the same model and optimizer, inside one live trainer run: `rounds`
    pairs of windows, alternating their order, each one unmeasured step and then `steps` timed ones. The trainer's
    windows are its own `train_loop` (streaming its corpus, logging every step), timed from its step records' stamps;
    only its end-of-run checkpoint and stream shutdown are held back between windows."""
    dims, seq_len, batch, _, warmup, _ = CASES[name]
    work, cfg_path = tmp / f"{name}-in-run", tmp / f"{name}-in-run.yaml"
    cfg_path.write_text(yaml.safe_dump(trainer_config(work, tokenizer, dims, seq_len, batch, 10**6)))
    real_loop, real_save = train_module.train_loop, loop_module.save_checkpoint
    rates: dict[str, list[float]] = {"trainer": [], "bare": []}

    def alternate(run, stop, heartbeat) -> dict:
        bare = BareLoop(dims, seq_len, batch, model=run.engine.module, opt=run.engine.optimizer)
        close, run.stream.close = run.stream.close, lambda: None
        loop_module.save_checkpoint = lambda run, **_: None

        def trainer_window(n: int = steps + 1) -> float:
            run.cfg.train.steps = run.state.step + n
            real_loop(run, stop, heartbeat)
            lines = (work / "metrics.jsonl").read_text().splitlines()
            a, b = (json.loads(x) for x in (lines[-steps - 1], lines[-1]))
            return (b["tokens"] - a["tokens"]) / (b["time"] - a["time"])

        try:
            # first the start-up steps (compile, the first blocks of the streams), as the rounds above leave out
            trainer_window(max(warmup, steps + 1))
            timed(bare, 1)
            for r in range(rounds):
                for key in ("trainer", "bare")[:: 1 if r % 2 == 0 else -1]:
                    rates[key].append(trainer_window() if key == "trainer" else settled(bare, steps))
                print(
                    f"  {name} in-run round {r + 1}/{rounds}: trainer loop {rates['trainer'][-1]:,.1f}, "
                    f"bare loop on its model {rates['bare'][-1]:,.1f} tokens/s",
                    flush=True,
                )
        finally:
            loop_module.save_checkpoint = real_save
            run.stream.close = close
            close()
        run.cfg.train.steps = run.state.step
        return {}

    train_module.train_loop = alternate
    try:
        train(load_config(cfg_path))
    finally:
        train_module.train_loop = real_loop
    ratios = [t / b for t, b in zip(rates["trainer"], rates["bare"])]
    return {"vs_bare": statistics.median(ratios), "rounds": ratios}


def scaling(tmp: Path, tokenizer: Path, steps: int = 14) -> dict:
    """tokens/s of 2 ranks x 1 thread over 1 rank x 1 thread (ddp, compile, 16M case), alternated twice."""
    dims, seq_len, batch, _, warmup, _ = CASES["16M"]
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(2):
        for ranks in (1, 2):
            work = tmp / f"dp{ranks}-{r}"
            cfg = trainer_config(work, tokenizer, dims, seq_len, batch, steps)
            (tmp / f"dp{ranks}-{r}.yaml").write_text(yaml.safe_dump(cfg))
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
            cmd += ["-m", "trainer", "train", str(tmp / f"dp{ranks}-{r}.yaml")]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
            rates[ranks].append(read_run(work, 0.0, warmup)["tokens_per_s"])
            print(f"  scaling round {r + 1}/2: {ranks} rank(s) x 1 thread {rates[ranks][-1]:,.0f} tokens/s", flush=True)
    return {
        "ratio": statistics.median(b / a for a, b in zip(rates[1], rates[2])),
        "one": statistics.median(rates[1]),
        "two": statistics.median(rates[2]),
    }


def profile(name: str, steps: int = 3) -> None:
    """Where a step's time goes: torch.profiler's table over `steps` steady-state steps of the trainer's model, compile
    setting and optimizer (the bare loop; the trainer's own overhead is the row above)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dims, seq_len, batch = CASES[name][:3]
    loop = BareLoop(dims, seq_len, batch)
    timed(loop, 3)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        rate = timed(loop, steps)
    print(f"{name}: {rate:,.0f} tokens/s over {steps} profiled steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def verdict(value: float, target: float, higher: bool, unit: str = "x") -> str:
    ok = value >= target if higher else value <= target
    if ok:
        return "pass"
    gap = target - value if higher else value - target
    return f"short by {gap:.2f}{unit}" if unit == "x" else f"over by {gap:.1f}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(CASES), action="append")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-scaling", action="store_true", help="skip the 2-rank runs")
    p.add_argument("--profile", choices=sorted(CASES), help="only print where a step of this case spends its time")
    args = p.parse_args()
    os.environ.pop("TRAINER_PEAK_TFLOPS", None)  # the MFU rows compare the trainer's measured peak with the bench's
    if args.profile:
        profile(args.profile)
        return
    peak_start = matmul_peak()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32; matmul peak {peak_start / 1e9:.1f} GFLOP/s (2048^3, best of 10)",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        tok = train_tokenizer("bpe", 2048, [str(CORPUS)], tmp / "tok")
        cases = {name: run_case(name, tmp, tok, args.rounds) for name in args.only or list(CASES)}
        for name, c in cases.items():
            c["in_run"] = in_run_overhead(name, tmp, tok)
        scale = None if args.no_scaling else scaling(tmp, tok)
    peak_end = matmul_peak()
    for name, c in cases.items():
        dims, seq_len, batch = CASES[name][:3]
        peak = c["peak"]
        shape = f"{name} (L{dims['n_layer']} d{dims['d_model']}, seq {seq_len} x batch {batch})"
        rows.append(
            (
                f"tokens/s, {shape}",
                (
                    f"{c['vs_peer']:.2f}x ({c['trainer_tokens_per_s']:,.0f} vs {c['peer_tokens_per_s']:,.0f}; "
                    f"rounds {', '.join(f'{v:.2f}' for v in c['vs_peer_rounds'])})"
                ),
                ">= 1.0x",
                f"transformers {'LlamaForCausalLM' if arch_of(dims) == 'llama' else 'GPT2LMHeadModel'} + torch.compile(model+loss), plain AdamW",
                verdict(c["vs_peer"], 1.0, True),
            )
        )
        independent = c["independent_mfu"]
        peer_mfu = c["peer_tokens_per_s"] * c["flops_per_token"] / peak
        diff = 100 * c["mfu_diff"]
        rows.append(
            (
                f"MFU, {name}",
                (
                    f"logged {100 * c['logged_mfu']:.1f}% vs independent {100 * independent:.1f}% "
                    f"(transformers {100 * peer_mfu:.1f}%)"
                ),
                "within 2 points",
                (
                    f"tokens/s from step stamps x 6N+12LdT over a peak measured before each round (median "
                    f"{peak / 1e9:.0f}; trainer's {c['trainer_peak'] / 1e9:.0f} GFLOP/s); median per-round gap"
                ),
                verdict(diff, 2.0, False, " points"),
            )
        )
        in_run = c["in_run"]
        overhead = 100 * (1 - in_run["vs_bare"])
        rows.append(
            (
                f"trainer overhead, {name}",
                f"{overhead:.1f}% (rounds {', '.join(f'{100 * (1 - v):.1f}' for v in in_run['rounds'])})",
                "<= 3%",
                "bare forward/backward/clip/step loop on the same model and optimizer, windows alternating in one run",
                verdict(overhead, 3.0, False, "%"),
            )
        )
        fresh = 100 * (1 - c["vs_bare"])
        rows.append(
            (
                f"fresh runs vs bare loop, {name}",
                f"{fresh:.1f}% (rounds {', '.join(f'{100 * (1 - v):.1f}' for v in c['vs_bare_rounds'])})",
                "reported",
                "the rounds above against the bench's own bare-loop model, mean of the runs before and after",
                "-",
            )
        )
        rows.append(
            (
                f"data-loader wait, {name}",
                f"{100 * c['data_wait']:.2f}% of step time",
                "<= 1%",
                "streaming tokenization, 1 worker (default)",
                verdict(100 * c["data_wait"], 1.0, False, "%"),
            )
        )
        rows.append(
            (
                f"compile start-up, {name}",
                (
                    f"{c['startup_cold_s']:.0f} s cold, {c['startup_warm_s']:.0f} s warm cache (a step: "
                    f"{c['step_s']:.2f} s); then {c['warmup_data_wait']:.1f} s of data wait in warm-up steps"
                ),
                "reported",
                "train() call to the end of step 1 (model build, compile, first blocks tokenized)",
                "-",
            )
        )
    if scale is not None:
        rows.append(
            (
                "2 ranks x 1 thread vs 1 x 1 (ddp, 16M)",
                f"{scale['ratio']:.2f}x ({scale['two']:,.0f} vs {scale['one']:,.0f})",
                ">= 1.8x",
                "the same trainer config under torchrun, OMP_NUM_THREADS=1",
                verdict(scale["ratio"], 1.8, True),
            )
        )
    print(
        f"matmul peak at the end: {peak_end / 1e9:.1f} GFLOP/s ({100 * (peak_end / peak_start - 1):+.1f}% on the start)"
    )
    print("\n| figure | measured | target | compared with | result |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
