"""A pipeline schedule played out: each rank's actions in the order its runtime runs them, with given durations, for
the bubble (each rank's idle share of the step) and the micro-batches whose activations each rank holds at once.
Shared by the planner (`trainer plan`) and `bench/pipeline_bubble.py`."""

from __future__ import annotations

from torch.distributed import pipelining
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

from trainer.parallel.pipeline import SCHEDULES

KINDS = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}


def action_orders(schedule: str, p: int, m: int) -> list[list[tuple[str, int, int]]]:
    """Per rank, the (kind, stage, micro-batch) compute actions in the order the schedule runs them. Multi-stage
    schedules: their own `pipeline_order` (through torch's get_schedule_ops). One stage per rank (GPipe, 1F1B): the
    order their `_step_microbatches` runs, written out here (torch 2.13's visualizer numbers later ranks' micro-batches
    from 1): GPipe all forwards then all backwards; 1F1B p - r forwards on rank r, then backward/forward pairs, then
    the remaining backwards."""
    if schedule == "gpipe":
        return [[("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)] for r in range(p)]
    if schedule == "1f1b":
        orders = []
        for r in range(p):
            warm = min(m, p - r)
            order = [("F", r, i) for i in range(warm)]
            for i in range(m - warm):
                order += [("B", r, i), ("F", r, warm + i)]
            orders.append(order + [("B", r, i) for i in range(m - warm, m)])
        return orders
    cls_name, _, per_rank = SCHEDULES[schedule]
    ops = get_schedule_ops(getattr(pipelining, cls_name), p, m, per_rank or 2)
    return [
        [
            (KINDS[a.computation_type.name], a.stage_index, a.microbatch_index)
            for a in rank
            if a is not None and a.computation_type.name in KINDS
        ]
        for rank in ops
    ]


def play(schedule: str, p: int, m: int, costs: list[dict], held_bytes: list[float] | None = None) -> dict:
    """Plays the schedule's per-rank action order with the durations of its stages (`costs`: one dict per stage with
    seconds for "F", "B", "I" and "W"): an action starts when its rank is free and its inputs exist (the previous
    stage's forward of that micro-batch, the next stage's backward of it, its own input gradient before a weight
    gradient). Returns each rank's `bubble` (idle share of the step), `peak_in_flight` (the most micro-batches of
    activations it holds at once, in units of a whole rank's layers), the `step_s`, and with `held_bytes` (one
    micro-batch's activations per stage) `peak_held_bytes` per rank and whether that peak comes after the rank's first
    backward (`peak_after_backward`)."""
    per_rank = SCHEDULES[schedule][2]
    v = per_rank or 2
    queues = action_orders(schedule, p, m)
    n_stages = len(costs)
    done: dict[tuple, float] = {}
    free = [0.0] * p
    busy = [0.0] * p
    held, peak = [0] * p, [0] * p  # micro-batches whose activations a rank holds
    held_b, peak_b = [0.0] * p, [0.0] * p
    backward_done, peak_after_backward = [False] * p, [False] * p
    pos = [0] * p
    while any(pos[r] < len(queues[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(queues[r]):
                kind, s, mb = queues[r][pos[r]]
                if kind == "F":
                    deps, key = ([("F", s - 1, mb)] if s > 0 else []), ("F", s, mb)
                elif kind in ("B", "I"):  # a full backward also gives the previous stage its input gradient
                    deps, key = [("F", s, mb)] + ([("I", s + 1, mb)] if s < n_stages - 1 else []), ("I", s, mb)
                else:
                    deps, key = [("I", s, mb)], ("W", s, mb)
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                duration = costs[s][kind]
                done[key] = free[r] = start + duration
                busy[r] += duration
                weight = held_bytes[s] if held_bytes else 0.0
                if kind == "F":
                    held[r] += 1
                    held_b[r] += weight
                    peak[r] = max(peak[r], held[r])
                    if held_b[r] >= peak_b[r]:
                        peak_b[r] = held_b[r]
                        peak_after_backward[r] = backward_done[r]
                elif kind in ("B", "W"):
                    held[r] -= 1
                    held_b[r] -= weight
                    backward_done[r] = True
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule}: the action order deadlocks")
    step = max(free)
    return {
        "bubble": [1 - b / step for b in busy],
        "peak_in_flight": [pk / v for pk in peak],  # in micro-batches of a whole rank's layers
        "peak_held_bytes": peak_b,
        "peak_after_backward": peak_after_backward,  # whether a rank's gradients exist when it holds the most
        "step_s": step,
    }
