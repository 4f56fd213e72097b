"""The pipeline bubble of each schedule, for p = 2 and 4 stages (ranks) and m = 4 and 8 micro-batches, next to theory;
and each pp rank's memory: model state and peak activations held.

How it is measured: the stages of a real model (GPT, 8 layers, d_model 256, seq 128, micro-batch 4, vocab 8192; the
layers split by the trainer's default split, the head on the last stage) are timed on this machine, one at a time:
forward, full backward, and the two halves zero-bubble schedules split it into (input gradient, then weight
gradient). Each schedule's own action order, per rank (`torch.distributed.pipelining`'s `get_schedule_ops`, the
order its runtime executes), is then played with those durations: an action starts when its rank is free and its
inputs exist (the previous stage's forward of that micro-batch, the next stage's backward of it, its own input
gradient before a weight gradient). Each rank's idle time over the step is its bubble. Four stage processes cannot
be timed side by side on a 2-core machine without measuring the contention instead; p2p transfer time is left out
(gloo on one host makes it noise here; it adds to every schedule alike on a real cluster).

Theory: 1F1B and GPipe idle (p-1)/(m+p-1) of the step; interleaving v stages per rank cuts it to
(p-1)/(v m + p-1); zero-bubble schedules fill it with weight gradients (ideally 0 once m >= p). The first table
plays equal stages (the measured work spread evenly), which is what the theory assumes; the second the real split,
whose costliest stage (the head and fp32 loss over an 8192-token vocabulary on CPU) sets the pace.

Run: python bench/pipeline_bubble.py
"""

from __future__ import annotations

import statistics
import time

import torch

from trainer.models import build_model
from trainer.parallel.pipeline import SCHEDULES, balanced_split, head_cost_in_blocks, plan_pipeline, stage_module
from trainer.plan.schedule import play

MODEL = {"n_layer": 8, "n_head": 4, "d_model": 256, "vocab_size": 8192, "max_seq_len": 128, "dropout": 0.0}
MICRO_BATCH, SEQ = 4, 128
NAMES = ["1f1b", "gpipe", "interleaved-1f1b", "zero-bubble", "zbv"]


def timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def stage_costs(n_stages: int) -> tuple[list[dict], list[int]]:
    """Per stage: seconds of F, B (full backward), I (input gradient), W (weight gradient) for one micro-batch, the
    activation bytes one micro-batch keeps for backward, and the stage's parameters."""
    torch.manual_seed(0)
    with torch.device("meta"):
        whole = build_model("gpt", **MODEL)
    split = balanced_split(MODEL["n_layer"], n_stages, head_cost_in_blocks(whole, SEQ))
    plan = plan_pipeline(n_stages, "1f1b", 0, split, MODEL["n_layer"], 0.0, n_stages)
    costs = []
    x = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, SEQ))
    labels = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, SEQ))
    for s in range(n_stages):
        part = stage_module(whole, plan, s).to_empty(device="cpu")
        for p in part.parameters():
            torch.nn.init.normal_(p, std=0.02)
        first, last = s == 0, s == n_stages - 1
        inp = x if first else torch.randn(MICRO_BATCH, SEQ, MODEL["d_model"], requires_grad=True)
        costs.append(measure_stage(part, inp, labels if last else None, first))
    return costs, split


def measure_stage(part: torch.nn.Module, inp: torch.Tensor, labels: torch.Tensor | None, first: bool) -> dict:
    def forward():
        return part(inp) if labels is None else part(inp, labels=labels)

    def seed(out):
        return None if labels is not None else torch.ones_like(out)

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    f = timed(forward)
    b = timed(lambda: torch.autograd.backward((out := forward()), seed(out))) - f
    if first:  # no input gradient to the first stage: its backward is all weight gradient
        i, w = 0.0, b
    else:
        out = forward()
        i = timed(lambda: torch.autograd.grad(out, [inp], seed(out), retain_graph=True))
        w = max(b - i, 0.0)
    return {"F": f, "B": b, "I": i, "W": w, "act": saved[0], "params": sum(p.numel() for p in part.parameters())}


def main() -> None:
    print(
        f"pipeline bubble: GPT {MODEL['n_layer']} layers x {MODEL['d_model']}, vocab {MODEL['vocab_size']}, "
        f"micro-batch {MICRO_BATCH} x {SEQ} tokens, fp32 on CPU ({torch.get_num_threads()} threads)"
    )
    for p in (2, 4):
        costs, split = stage_costs(p)
        virtual, _ = stage_costs(2 * p)  # interleaved and V schedules: 2 stages per rank
        print(f"\np = {p}: default split {split} layers (head on the last stage); per stage, one micro-batch:")
        for s, c in enumerate(costs):
            print(
                f"  stage {s}: F {c['F'] * 1e3:6.1f} ms  B {c['B'] * 1e3:6.1f} ms (I {c['I'] * 1e3:5.1f} + W "
                f"{c['W'] * 1e3:5.1f})  activations {c['act'] / 2**20:6.1f} MiB/micro-batch  model state "
                f"{16 * c['params'] / 2**20:6.1f} MiB"
            )
        tables = (
            ("equal stages (each the mean of the measured ones): the schedules' own bubble", equal(costs), None),
            ("the measured stages of the default split (its imbalance included)", costs, virtual),
        )
        for label, table, table_v in tables:
            print(f"  {label}")
            print(f"  {'schedule':18s} {'m':>2s}  {'bubble':>7s}  {'theory':>7s}  {'per rank':30s} peak held")
            for m in (4, 8):
                for name in NAMES:
                    v = SCHEDULES[name][2] or 2
                    stages = table if v == 1 else (table_v or equal(table, 2 * p))
                    r = play(name, p, m, stages)
                    print(row(name, p, m, v, r))


def row(name: str, p: int, m: int, v: int, r: dict) -> str:
    theory = {"1f1b": (p - 1) / (m + p - 1), "gpipe": (p - 1) / (m + p - 1)}.get(name)
    theory = (p - 1) / (v * m + p - 1) if name == "interleaved-1f1b" else theory
    theory_s = f"{theory:7.1%}" if theory is not None else "   ~0 %"
    ranks = " ".join(f"{b:6.1%}" for b in r["bubble"])
    held = " ".join(f"{h:.1f}" for h in r["peak_in_flight"])
    return f"  {name:18s} {m:2d}  {statistics.mean(r['bubble']):7.1%}  {theory_s}  {ranks:30s} {held}"


def equal(costs: list[dict], n: int | None = None) -> list[dict]:
    """`n` identical stages sharing the measured stages' work (F and B the mean per stage, B split evenly into I, W)."""
    n = n or len(costs)
    scale = len(costs) / n
    f = statistics.mean(c["F"] for c in costs) * scale
    b = statistics.mean(c["B"] for c in costs) * scale
    return [{"F": f, "B": b, "I": b / 2, "W": b / 2} for _ in range(n)]


if __name__ == "__main__":
    main()
