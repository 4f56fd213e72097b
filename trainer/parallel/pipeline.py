"""Pipeline parallelism on `torch.distributed.pipelining`: the layer split, which rank holds which stage, the stage
modules, their initialisation, and the schedule.

A stage is the model itself with the blocks of other stages deleted and, away from the ends, the embeddings (first
stage) or the final norm and head (last stage) set to None (the families' `PIPELINE_FIRST` / `PIPELINE_LAST`), so every
parameter keeps its global name: checkpoints stay keyed as a single process keys them, and any layout reads them.

Stages go to ranks round-robin (`loop`: stage s on pp rank s mod pp; 1F1B, GPipe, interleaved 1F1B, looped BFS,
interleaved zero-bubble) or in a V (`v`: ZBV and DualPipeV put stages s and 2pp-1-s on rank s, so the first and last
stage share rank 0).

The default split balances compute: a block costs 1, the LM head (and its loss) costs its FLOPs in blocks
(2 d V against a block's 2 P_block + 4 T d per token: 4.5 blocks for GPT-2 small at T=1024), the embeddings
(lookups) nothing; stages are contiguous runs of at least one block, chosen to minimise the most expensive stage (then
the spread). So the last stage holds fewer blocks when the vocabulary is large.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from trainer.errors import UserError
from trainer.parallel.parallelize import copy_full_into, unwrapped

# name users know (torchtitan's) -> (torch class, stage placement, stages per rank: None = any >= 2)
SCHEDULES = {
    "1f1b": ("Schedule1F1B", "loop", 1),
    "gpipe": ("ScheduleGPipe", "loop", 1),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", "loop", None),
    "looped-bfs": ("ScheduleLoopedBFS", "loop", None),
    "zero-bubble": ("ScheduleInterleavedZeroBubble", "loop", None),
    "zbv": ("ScheduleZBVZeroBubble", "v", 2),
    "dualpipev": ("ScheduleDualPipeV", "v", 2),
}


# schedules that split a stage's backward into an input part and a later weight part (zero-bubble): the weight part
# reuses the graph the input part ran through (retain_graph), which compiled graphs refuse while they donate their
# saved buffers to the backward (PyTorch issue 161904); the engine turns the donation off for them
SPLIT_BACKWARD = ("zero-bubble", "zbv", "dualpipev")


@dataclass(frozen=True)
class PipelinePlan:
    """The pipeline of a run: `split[s]` layers in stage s (stages in model order), stage s on pp rank
    `stage_rank[s]`."""

    pp: int
    schedule: str
    split: tuple[int, ...]
    stage_rank: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.split)

    def layers(self, stage: int) -> range:
        start = sum(self.split[:stage])
        return range(start, start + self.split[stage])

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_rank) if r == pp_rank]

    def describe(self) -> list[list[int]]:
        """The layers of each stage, as the start record states them."""
        return [list(self.layers(s)) for s in range(self.n_stages)]


def stages_per_rank(schedule: str, virtual: int) -> int:
    _, _, fixed = SCHEDULES[schedule]
    if fixed is not None and virtual not in (0, fixed):
        raise UserError(
            f"parallel.pp_schedule={schedule} runs {fixed} stage{'s' if fixed > 1 else ''} per rank, not "
            f"parallel.pp_virtual={virtual}: leave parallel.pp_virtual unset, or pick "
            f"{'interleaved-1f1b or zero-bubble' if fixed == 1 else 'another schedule'}"
        )
    if fixed is None and virtual == 1:
        raise UserError(
            f"parallel.pp_schedule={schedule} interleaves several stages per rank: set parallel.pp_virtual >= 2 "
            f"(or leave it unset: 2), or use parallel.pp_schedule=1f1b for one stage per rank"
        )
    return fixed or virtual or 2


def plan_pipeline(
    pp: int,
    schedule: str,
    virtual: int,
    split: list[int] | None,
    n_layer: int,
    head_cost: float,
    micro_batches: int,
) -> PipelinePlan:
    """The plan, or one line saying what cannot run (checked before any process group exists)."""
    n_stages = pp * stages_per_rank(schedule, virtual)
    if n_stages > n_layer:
        raise UserError(
            f"parallel.pp={pp} with {n_stages // pp} stage(s) per rank makes {n_stages} stages, more than the "
            f"model's {n_layer} layers: lower parallel.pp (or parallel.pp_virtual), or use a deeper model"
        )
    if split is None:
        split = balanced_split(n_layer, n_stages, head_cost)
    else:
        check_split(split, n_layer, n_stages)
    check_micro_batches(schedule, micro_batches, pp, n_stages)
    _, style, _ = SCHEDULES[schedule]
    ranks = [s % pp if style == "loop" else (s if s < pp else 2 * pp - 1 - s) for s in range(n_stages)]
    return PipelinePlan(pp=pp, schedule=schedule, split=tuple(split), stage_rank=tuple(ranks))


def check_split(split: list[int], n_layer: int, n_stages: int) -> None:
    if len(split) != n_stages:
        raise UserError(
            f"parallel.pp_split has {len(split)} entries but the pipeline has {n_stages} stages (parallel.pp x "
            f"stages per rank): give one layer count per stage, in model order"
        )
    if any(n < 1 for n in split) or sum(split) != n_layer:
        raise UserError(
            f"parallel.pp_split={split} does not cover the model's {n_layer} layers once (it covers {sum(split)}, "
            f"and every stage needs at least one): make the counts positive and sum to {n_layer}"
        )


def check_micro_batches(schedule: str, m: int, pp: int, n_stages: int) -> None:
    """What torch's schedules refuse, said in config terms: 1F1B and DualPipeV need at least one micro-batch per stage
    to fill the pipeline; the interleaved ones run rounds of pp micro-batches, so m beyond pp must be a multiple."""
    need = {"1f1b": pp, "dualpipev": n_stages}.get(schedule)
    if need is not None and m < need:
        raise UserError(
            f"parallel.pp_schedule={schedule} needs at least {need} micro-batches per step (one per stage), got "
            f"train.grad_accum={m}: raise train.grad_accum to {need} or more (lower train.micro_batch to keep the "
            f"global batch), or use parallel.pp_schedule=gpipe"
        )
    if schedule in ("interleaved-1f1b", "zero-bubble") and m > pp and m % pp:
        raise UserError(
            f"parallel.pp_schedule={schedule} runs micro-batches in rounds of parallel.pp={pp}: "
            f"train.grad_accum={m} is not a multiple of {pp}; use {m - m % pp} or {m + pp - m % pp}"
        )
    if schedule == "zbv" and m < pp:
        raise UserError(
            f"parallel.pp_schedule=zbv needs at least parallel.pp={pp} micro-batches per step, got "
            f"train.grad_accum={m}: raise train.grad_accum"
        )


def balanced_split(n_layer: int, n_stages: int, head_cost: float) -> list[int]:
    """Contiguous layer counts (each >= 1) minimising the costliest stage, then the sum of squared stage costs; the
    last stage also pays `head_cost` (in blocks)."""
    inf = (float("inf"), float("inf"))
    # best[s][i]: (max cost, sum of squares) of the first i layers in s stages; choice[s][i]: layers in stage s-1
    best = [[inf] * (n_layer + 1) for _ in range(n_stages + 1)]
    choice = [[0] * (n_layer + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, n_stages + 1):
        extra = head_cost if s == n_stages else 0.0
        for i in range(s, n_layer + 1):
            for k in range(1, i - s + 2):
                prev = best[s - 1][i - k]
                if prev == inf:
                    continue
                cost = k + extra
                cand = (max(prev[0], cost), prev[1] + cost * cost)
                if cand < best[s][i]:
                    best[s][i], choice[s][i] = cand, k
    split, i = [], n_layer
    for s in range(n_stages, 0, -1):
        split.append(choice[s][i])
        i -= choice[s][i]
    return split[::-1]


def head_cost_in_blocks(model: nn.Module, seq_len: int) -> float:
    """The LM head's training FLOPs per token in units of one block's (see the module docstring)."""
    cfg = model.config
    block = next(iter(model.blocks.values()))
    block_params = sum(p.numel() for p in block.parameters())
    return (2 * cfg.d_model * cfg.vocab_size) / (2 * block_params + 4 * seq_len * cfg.d_model)


def stage_module(model: nn.Module, plan: PipelinePlan, stage: int) -> nn.Module:
    """A copy of the (meta-device) `model` holding only what `stage` computes, under the global names."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in plan.layers(stage)}
    for key in list(part.blocks.keys()):
        if key not in keep:
            del part.blocks[key]
    ends = [] if stage == 0 else list(type(model).PIPELINE_FIRST)
    ends += [] if stage == plan.n_stages - 1 else list(type(model).PIPELINE_LAST)
    for name in ends:
        setattr(part, name, None)
    return part


class _StageInit(TorchFunctionMode):
    """Runs the whole (meta-device) model's init in its order, so the RNG stream is the single process's: each
    in-place init of a meta parameter is done on a whole scratch tensor and copied into every stage parameter of that
    name this rank holds (a tied head's copy on the last stage included); the parameters of other ranks' stages are
    drawn and dropped."""

    def __init__(self, targets: dict[int, list[torch.Tensor]], device: torch.device) -> None:
        super().__init__()
        self.targets, self.device = targets, device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        in_place = name.endswith("_") and not name.startswith("__")
        if not (in_place and isinstance(t, torch.Tensor) and t.is_meta):
            return func(*args, **kwargs)
        scratch = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        if args:
            func(scratch, *args[1:], **kwargs)
        else:
            func(**{**kwargs, "tensor": scratch})
        for param in self.targets.get(id(t), []):
            copy_full_into(param, scratch)
        return t


@torch.no_grad()
def materialize_stages(model: nn.Module, parts: list[nn.Module], device: torch.device, seed: int) -> None:
    """Allocates this rank's stage modules (built on the meta device, possibly sharded) and initialises them with the
    weights `torch.manual_seed(seed); model.init_weights()` gives the whole model. `model` stays on the meta device."""
    canonical = {}  # every name of a whole-model parameter (a tied head's too) -> that parameter
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical[name] = p
    targets: dict[int, list[torch.Tensor]] = {}
    for part in parts:
        part.to_empty(device=device)
        for name, p in part.named_parameters():
            targets.setdefault(id(canonical[unwrapped(name)]), []).append(p)
    torch.manual_seed(seed)
    with _StageInit(targets, device):
        model.init_weights()
