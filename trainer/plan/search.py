"""The layouts `trainer plan` weighs for a model, a global batch and a cluster: every engine and ZeRO stage (with
and without CPU offload), tensor degree within a node, pipeline degree and schedule, activation checkpointing, and
micro-batch size (grad_accum keeping the global batch). Each is refused with the trainer's own one-line reason where
it cannot run, and otherwise estimated: its per-rank memory (`memory.estimate`) against the usable memory, and its
step time (`cost.step_cost`). The ones that fit come first, fastest first."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from trainer.errors import UserError
from trainer.models import ModelConfig
from trainer.parallel.context_parallel import check_cp
from trainer.plan.cost import DEFAULT_EFFICIENCY, StepCost, step_cost
from trainer.plan.hardware import Accelerator
from trainer.plan.memory import Breakdown, Layout, estimate
from trainer.plan.units import binary_bytes

ENGINES = [
    ("ddp", 0, "none"),
    ("fsdp", 2, "none"),
    ("fsdp", 3, "none"),
    ("deepspeed", 1, "none"),
    ("deepspeed", 2, "none"),
    ("deepspeed", 3, "none"),
    ("deepspeed", 2, "cpu"),
    ("deepspeed", 3, "cpu"),
]
SCHEDULES = ("1f1b", "interleaved-1f1b", "zbv")
AC_MODES = ("none", "selective", "full")
CATEGORY_NAMES = ("parameters", "gradients", "optimizer", "gathered", "activations", "logits")


@dataclass
class Candidate:
    layout: Layout
    memory: Breakdown | None = None
    cost: StepCost | None = None
    fits: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        lay = self.layout
        out = {
            "engine": lay.engine,
            "zero_stage": lay.zero_stage,
            "offload": lay.offload,
            "dp": lay.dp,
            "cp": lay.cp,
            "tp": lay.tp,
            "pp": lay.pp,
            "pp_schedule": lay.pp_schedule if lay.pp > 1 else None,
            "activation_checkpointing": lay.activation_checkpointing,
            "micro_batch": lay.micro_batch,
            "grad_accum": lay.grad_accum,
            "precision": lay.precision,
            "fits": self.fits,
            "reason": self.reason,
            "overrides": lay.overrides(),
        }
        if self.memory is not None:
            mem = self.memory
            out["per_rank_bytes"] = {
                **{k: getattr(mem, k) for k in CATEGORY_NAMES},
                "peak": mem.peak,
                "cpu": mem.cpu,
            }
            out["peak_at"] = mem.peak_at
            out["per_pp_rank_peak_bytes"] = [r["peak"] for r in mem.per_pp_rank] or [mem.peak]
        if self.cost is not None:
            out["step_time_s"] = self.cost.step_s
            out["cost"] = self.cost.as_dict()
        return out


def usable(acc: Accelerator, headroom: float) -> int:
    return int(acc.memory * headroom)


def check_runnable(model_cfg: ModelConfig, layout: Layout, seq_len: int) -> None:
    """The trainer's own refusals for a layout (UserError with its line), without a process group."""
    from trainer.config import ParallelConfig, validate_parallel
    from trainer.parallel.tensor_parallel import check_tp_degree

    p = ParallelConfig(
        engine=layout.engine,
        zero_stage=layout.zero_stage,
        tp=layout.tp,
        pp=layout.pp,
        pp_schedule=layout.pp_schedule,
        offload=layout.offload,
    )
    validate_parallel(p)
    if layout.tp > 1:
        check_tp_degree(layout.tp, model_cfg.tp_divisors(), seq_len)
    if layout.engine == "ddp" and layout.dp * layout.cp > 1 and (layout.tp > 1 or layout.pp > 1):
        raise UserError("parallel.engine=ddp combines tp or pp only with dp=1: use parallel.engine=fsdp")
    if layout.engine == "deepspeed" and layout.pp > 1:
        raise UserError("parallel.engine=deepspeed does not run under parallel.pp > 1: use parallel.engine=fsdp")
    check_cp(layout.cp, seq_len, layout.tp, model_cfg.arch, layout.engine, layout.pp)


def evaluate(
    model_cfg: ModelConfig,
    layout: Layout,
    seq_len: int,
    acc: Accelerator,
    headroom: float,
    efficiency: float = DEFAULT_EFFICIENCY,
) -> Candidate:
    c = Candidate(layout)
    try:
        check_runnable(model_cfg, layout, seq_len)
        c.memory = estimate(model_cfg, layout, seq_len)
    except UserError as e:
        c.reason = str(e)
        return c
    c.cost = step_cost(model_cfg, layout, seq_len, acc, efficiency)
    limit = usable(acc, headroom)
    c.fits = c.memory.peak <= limit
    if not c.fits:
        mem = c.memory
        biggest = max(CATEGORY_NAMES, key=lambda k: getattr(mem, k))
        c.reason = (
            f"peak {binary_bytes(mem.peak)} > {binary_bytes(limit)} usable ({mem.peak_at}; largest: {biggest} "
            f"{binary_bytes(getattr(mem, biggest))})"
        )
    return c


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(
    own: Layout, model_cfg: ModelConfig, seq_len: int, gpus_per_node: int, max_micro_batch: int = 64
) -> Iterator[Layout]:
    """Every layout of `own.world` ranks with `own`'s global batch and precision that the search weighs, in the
    order it weighs them (ties in the ranking keep this order)."""
    world, g = own.world, gpus_per_node
    global_batch = own.micro_batch * own.grad_accum * own.dp
    seen = set()
    for tp, cp in [(t, c) for t in _divisors(min(world, g)) if world % t == 0 for c in _divisors(world // t)]:
        try:  # a cp degree this model or sequence cannot take is not a candidate (the trainer's own rule)
            check_cp(cp, seq_len, tp, model_cfg.arch, "fsdp", 1)
        except UserError:
            continue
        for pp in [p for p in _divisors(world // (tp * cp)) if p <= model_cfg.n_layer and (p == 1 or cp == 1)]:
            dp = world // (tp * cp * pp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            for engine, zero, offload in ENGINES:
                if engine != "fsdp" and pp > 1 and not (engine == "ddp" and dp == 1):
                    continue
                if cp > 1 and engine == "deepspeed":
                    continue
                if (engine == "deepspeed" and tp > 1) or (engine == "ddp" and dp * cp > 1 and tp > 1):
                    continue
                for sched in SCHEDULES if pp > 1 else ("1f1b",):
                    for ac in AC_MODES:
                        for mb in [d for d in _divisors(per_rank) if d <= max_micro_batch]:
                            lay = Layout(
                                engine, zero, offload, dp, tp, pp, sched, 0, ac, mb, per_rank // mb, own.precision
                            )
                            lay = replace(lay, cp=cp) if cp > 1 else lay
                            if lay not in seen:
                                seen.add(lay)
                                yield lay


PROGRESS_AFTER_S = 3.0  # a search still running after this long says how far it got on stderr
PROGRESS_EVERY_S = 2.0


def search(
    model_cfg: ModelConfig,
    own: Layout,
    seq_len: int,
    acc: Accelerator,
    headroom: float,
    efficiency: float = DEFAULT_EFFICIENCY,
    max_micro_batch: int = 64,
) -> list[Candidate]:
    """Every layout of `own.world` ranks with `own`'s global batch and precision, best first: those that fit by
    step time (then peak), then those that do not by peak, then those that cannot run. A search that takes more than
    PROGRESS_AFTER_S seconds says on stderr how many layouts it has weighed, of how many."""
    todo = list(layouts(own, model_cfg, seq_len, acc.gpus_per_node, max_micro_batch))
    out: list[Candidate] = []
    start = time.monotonic()
    said = start + PROGRESS_AFTER_S - PROGRESS_EVERY_S
    for i, lay in enumerate(todo):
        now = time.monotonic()
        if now - start >= PROGRESS_AFTER_S and now - said >= PROGRESS_EVERY_S:
            print(f"trainer plan: searched {i:,} of {len(todo):,} layouts...", file=sys.stderr, flush=True)
            said = now
        c = evaluate(model_cfg, lay, seq_len, acc, headroom, efficiency)
        if c.memory is None and lay.pp > 1:
            continue  # a schedule that cannot run this micro-batch count: not a candidate
        out.append(c)
    if time.monotonic() - start >= PROGRESS_AFTER_S:
        print(
            f"trainer plan: searched {len(todo):,} layouts in {time.monotonic() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return rank(out)


def rank(cands: list[Candidate]) -> list[Candidate]:
    fit = sorted((c for c in cands if c.fits), key=lambda c: (c.cost.step_s, c.memory.peak))
    over = sorted((c for c in cands if not c.fits and c.memory), key=lambda c: c.memory.peak)
    bad = [c for c in cands if c.memory is None]
    return fit + over + bad
