"""A pipeline schedule played out: each rank's actions in the order its runtime runs them, with given durations, for
the bubble (each rank's idle share of the step) and the micro-batches whose activations each rank holds at once.
Shared by the planner (`trainer plan`) and `bench/pipeline_bubble.py`.

The planner plays thousands of layouts, some with hundreds of ranks' worth of micro-batches, so three things keep it
fast without changing a figure: action orders are computed once per (schedule, pp, micro-batches); the play is
event-driven (a rank blocked on another's action waits in a list until that action is done), linear in the actions;
and `play_steady` plays a long step as its first rounds: past its warm-up a schedule repeats one round of pp
micro-batches, so the step time grows by the same amount each round and the activations held never exceed their
early peak. It checks that on three consecutive rounds before it extrapolates, and plays the whole step otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from torch.distributed import pipelining
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

from trainer.parallel.pipeline import SCHEDULES

KINDS = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}
EXACT_ACTIONS = 50_000  # steps with more compute actions than this are played as their first rounds (play_steady)


@lru_cache(maxsize=512)
def action_orders(schedule: str, p: int, m: int, v: int = 0) -> tuple[tuple[tuple[str, int, int], ...], ...]:
    """Per rank, the (kind, stage, micro-batch) compute actions in the order the schedule runs them, with `v` stages
    per rank (0: the schedule's own count, or 2; parallel.pp_virtual). Multi-stage schedules: their own per-rank
    order (torch's `_calculate_single_rank_operations`, or get_schedule_ops). One stage
    per rank (GPipe, 1F1B): the order their `_step_microbatches` runs, written out here (torch 2.13's visualizer
    numbers later ranks' micro-batches from 1): GPipe all forwards then all backwards; 1F1B p - r forwards on rank r,
    then backward/forward pairs, then the remaining backwards."""
    if schedule == "gpipe":
        return tuple(tuple([("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)]) for r in range(p))
    if schedule == "1f1b":
        orders = []
        for r in range(p):
            warm = min(m, p - r)
            order = [("F", r, i) for i in range(warm)]
            for i in range(m - warm):
                order += [("B", r, i), ("F", r, warm + i)]
            orders.append(tuple(order + [("B", r, i) for i in range(m - warm, m)]))
        return tuple(orders)
    cls_name, _, per_rank = SCHEDULES[schedule]
    v = v or per_rank or 2
    ops = _rank_operations(schedule, p, m, v) or get_schedule_ops(getattr(pipelining, cls_name), p, m, v)
    return tuple(
        tuple(
            (KINDS[a.computation_type.name], a.stage_index, a.microbatch_index)
            for a in rank
            if a is not None and a.computation_type.name in KINDS
        )
        for rank in ops
    )


def _rank_operations(schedule: str, p: int, m: int, v: int = 2) -> list | None:
    """The per-rank orders of interleaved 1F1B and ZBV straight from the schedule class's own per-rank method, with
    the few attributes it reads set by hand: get_schedule_ops builds mock stages and the communication plan, which
    take seconds at pp 32 and are not needed here. None when the class no longer works that way (the caller then
    asks get_schedule_ops); tests/test_plan.py checks both give the same orders."""
    if schedule not in ("interleaved-1f1b", "zbv") or (schedule == "zbv" and v != 2):
        return None
    cls = getattr(pipelining, SCHEDULES[schedule][0])
    try:
        sched = cls.__new__(cls)
        sched.pp_group_size, sched.n_local_stages, sched._n_microbatches, sched.num_stages = p, v, m, v * p
        sched.number_of_rounds = max(1, m // p)
        sched.microbatches_per_round = m // sched.number_of_rounds
        return [sched._calculate_single_rank_operations(r) for r in range(p)]
    except (AttributeError, TypeError):
        return None


@dataclass(frozen=True)
class Events:
    """What a schedule's action order says about activations, whatever the durations: per rank, the compute actions
    that take (+1, a forward) or free (-1, the backward or weight-gradient that ends a micro-batch) one micro-batch's
    activations of a stage, flattened over ranks (`starts`: where each rank's begin), whether the rank had run a
    backward before each, and the most micro-batches each rank holds at once."""

    stage: np.ndarray
    sign: np.ndarray
    backward_before: np.ndarray
    starts: np.ndarray
    in_flight: tuple[int, ...]


@dataclass(frozen=True)
class Played:
    """A schedule played with given stage durations: the step's length and each rank's busy time (its activation
    events do not depend on the durations)."""

    step_s: float
    busy: tuple[float, ...]
    events: Events


@lru_cache(maxsize=512)
def _compiled(schedule: str, p: int, m: int, n_stages: int) -> tuple[list, Events, int]:
    """The action orders as integers, once per schedule, pp, micro-batches and stages: per rank, for each action,
    (cost column, stage, the slot its end time goes to, the slots of the one or two actions it waits for, or -1).
    Slots: forwards, then input gradients (a full backward's too), then weight gradients, each stage x micro-batch
    (the third value: how many)."""
    orders = action_orders(schedule, p, m, n_stages // p)
    mbs = 1 + max((mb for order in orders for _, _, mb in order), default=0)

    def f_slot(s: int, mb: int) -> int:
        return s * mbs + mb

    def i_slot(s: int, mb: int) -> int:
        return (n_stages + s) * mbs + mb

    queues, stage, sign, before, starts, in_flight = [], [], [], [], [], []
    for order in orders:
        queue, held, most, backward = [], 0, 0, False
        starts.append(len(stage))
        for kind, s, mb in order:
            if kind == "F":
                queue.append((0, s, f_slot(s, mb), f_slot(s - 1, mb) if s > 0 else -1, -1))
            elif kind in ("B", "I"):  # a full backward also gives the previous stage its input gradient
                wait = i_slot(s + 1, mb) if s < n_stages - 1 else -1
                queue.append((1 if kind == "B" else 2, s, i_slot(s, mb), f_slot(s, mb), wait))
            else:
                queue.append((3, s, (2 * n_stages + s) * mbs + mb, i_slot(s, mb), -1))
            if kind in ("F", "B", "W"):
                stage.append(s)
                sign.append(1 if kind == "F" else -1)
                before.append(backward)
                held += sign[-1]
                most = max(most, held)
                backward = backward or kind != "F"
        queues.append(queue)
        in_flight.append(most)
    events = Events(
        np.array(stage, dtype=np.int64),
        np.array(sign, dtype=np.float64),
        np.array(before, dtype=bool),
        np.array(starts, dtype=np.int64),
        tuple(in_flight),
    )
    return queues, events, 3 * n_stages * mbs


def _play_orders(schedule: str, p: int, m: int, costs: tuple[tuple[float, float, float, float], ...]) -> Played:
    """Each action starts when its rank is free and its inputs exist (the previous stage's forward of that
    micro-batch, the next stage's backward of it, its own input gradient before a weight gradient). A rank whose
    next action waits for another rank's waits in a list under that action's slot until it is done."""
    queues, events, slots = _compiled(schedule, p, m, len(costs))
    done = [-1.0] * slots
    waiting: dict[int, list[int]] = {}
    free, busy, pos = [0.0] * p, [0.0] * p, [0] * p
    ready = list(range(p))
    while ready:
        r = ready.pop()
        queue, at, t_free, t_busy = queues[r], pos[r], free[r], busy[r]
        while at < len(queue):
            column, s, slot, first, second = queue[at]
            start = t_free
            if first >= 0:
                if done[first] < 0:
                    waiting.setdefault(first, []).append(r)
                    break
                start = max(start, done[first])
            if second >= 0:
                if done[second] < 0:
                    waiting.setdefault(second, []).append(r)
                    break
                start = max(start, done[second])
            duration = costs[s][column]
            done[slot] = t_free = start + duration
            t_busy += duration
            at += 1
            if slot in waiting:
                ready.extend(waiting.pop(slot))
        pos[r], free[r], busy[r] = at, t_free, t_busy
    if any(pos[r] < len(queues[r]) for r in range(p)):
        raise RuntimeError(f"{schedule}: the action order deadlocks")
    return Played(max(free), tuple(busy), events)


_PLAYED: dict[tuple, Played] = {}


def _played(schedule: str, p: int, m: int, costs: tuple) -> Played:
    key = (schedule, p, m, costs)
    if key not in _PLAYED:
        _PLAYED[key] = _play_orders(schedule, p, m, costs)
    return _PLAYED[key]


_PEAKS: dict[tuple, tuple[list[float], list[bool]]] = {}


def held_peaks(events: Events, held_bytes: list[float]) -> tuple[list[float], list[bool]]:
    """Per rank, the most activation bytes held at once (one micro-batch of stage s holds held_bytes[s]) and whether
    that peak is (last) reached after the rank's first backward. Byte counts are whole numbers and every rank ends
    holding nothing, so the running sums over all ranks at once are exact."""
    key = (id(events), tuple(held_bytes))
    if key not in _PEAKS:
        _PEAKS[key] = _held_peaks(events, held_bytes)
    return _PEAKS[key]


def _held_peaks(events: Events, held_bytes: list[float]) -> tuple[list[float], list[bool]]:
    lengths = np.diff(np.append(events.starts, len(events.stage)))
    if len(events.stage) == 0 or (lengths == 0).any():
        return [0.0] * len(lengths), [False] * len(lengths)
    change = events.sign * np.asarray(held_bytes, dtype=np.float64)[events.stage]
    running = np.cumsum(change)
    held = running - np.repeat(running[events.starts] - change[events.starts], lengths)
    reached = np.where(events.sign > 0, held, -np.inf)  # a peak is reached by a forward
    peak = np.maximum.reduceat(reached, events.starts)
    at = np.where(reached == np.repeat(peak, lengths), np.arange(len(reached)), -1)
    last = np.maximum.reduceat(at, events.starts)
    found = peak >= 0.0
    return np.where(found, peak, 0.0).tolist(), (found & events.backward_before[last]).tolist()


def _result(played: Played, v: int, held_bytes: list[float] | None, step: float, busy) -> dict:
    n_stages = 1 + int(played.events.stage.max(initial=0))
    peaks, after = held_peaks(played.events, held_bytes or [0.0] * n_stages)
    return {
        "bubble": [1 - b / step for b in busy],
        "peak_in_flight": [k / v for k in played.events.in_flight],  # in micro-batches of a whole rank's layers
        "peak_held_bytes": peaks,
        "peak_after_backward": after,  # whether a rank's gradients exist when it holds the most
        "step_s": step,
    }


def _as_costs(costs: list[dict]) -> tuple:
    return tuple((c["F"], c["B"], c["I"], c["W"]) for c in costs)


def play(schedule: str, p: int, m: int, costs: list[dict], held_bytes: list[float] | None = None) -> dict:
    """Plays the schedule's per-rank action order with the durations of its stages (`costs`: one dict per stage with
    seconds for "F", "B", "I" and "W"). Returns each rank's `bubble` (idle share of the step), `peak_in_flight` (the
    most micro-batches of activations it holds at once, in units of a whole rank's layers), the `step_s`, and with
    `held_bytes` (one micro-batch's activations per stage) `peak_held_bytes` per rank and whether that peak comes
    after the rank's first backward (`peak_after_backward`)."""
    v = max(1, len(costs) // p)  # stages per rank
    played = _played(schedule, p, m, _as_costs(costs))
    return _result(played, v, held_bytes, played.step_s, played.busy)


def play_steady(schedule: str, p: int, m: int, costs: list[dict], held_bytes: list[float] | None = None) -> dict:
    """`play`, for a step of many micro-batches played as a shorter one: when the whole step has more than
    EXACT_ACTIONS actions, steps of m0 and m0 + p micro-batches are played (m0 = 4 p + m mod p to start with, so the
    orders have the same shape). Where one more round of p micro-batches lengthens the step by exactly the busiest
    rank's work for that round (that rank is saturated: it never waits, and no rank can go faster than its own
    work), and leaves every rank's activation peaks unchanged, the step is extrapolated to m by that much per round.
    Otherwise m0 doubles, up to m, which is then played whole."""
    v = max(1, len(costs) // p)  # stages per rank
    c = _as_costs(costs)
    if p * m * v * 2 <= EXACT_ACTIONS:
        return play(schedule, p, m, costs, held_bytes)
    m0 = 4 * p + m % p
    weights = held_bytes or [1.0] * len(c)
    while m0 + p < m:
        short, longer = _played(schedule, p, m0, c), _played(schedule, p, m0 + p, c)
        grow = longer.step_s - short.step_s
        round_work = [b1 - b0 for b0, b1 in zip(short.busy, longer.busy, strict=True)]
        saturated = abs(grow - max(round_work)) <= 1e-9 * longer.step_s
        peaks = held_peaks(short.events, weights)[0] == held_peaks(longer.events, weights)[0]
        if saturated and peaks and short.events.in_flight == longer.events.in_flight:
            rounds = (m - m0) // p
            busy = [b0 + rounds * w for b0, w in zip(short.busy, round_work, strict=True)]
            return _result(short, v, held_bytes, short.step_s + rounds * grow, busy)
        m0 += (m0 // p) * p  # not yet saturated: twice as many rounds
    return play(schedule, p, m, costs, held_bytes)
