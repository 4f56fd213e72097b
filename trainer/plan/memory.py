"""The memory formula: bytes per rank of one training step, by category, for a model and a layout.

Everything is counted from the model's real parameter shapes (built on the meta device), the engines' sharding rules
and each family's count of what its forward saves for backward (`ModelConfig.saved_bytes`):

- `parameters`: what a rank keeps between steps. ddp: every parameter of its tp shard (4 B each in fp32); fsdp: its
  FSDP2 shard of every parameter (dim 0 split over dp, padded to a multiple of dp); DeepSpeed ZeRO-1/2: every
  parameter in the training dtype, ZeRO-3: its 1/dp partition (small parameters kept whole).
- `gradients`: held when backward ends: ddp the whole (its all-reduce buckets), fsdp its shard, DeepSpeed ZeRO-1
  the whole, ZeRO-2/3 its partition plus one reduce bucket.
- `optimizer`: AdamW's two fp32 moments of the rank's shard (DeepSpeed: plus the fp32 master partition); under
  `offload=cpu` in CPU memory instead (`cpu`).
- `gathered`: parameters (and buffers) held beyond the shard at the peak: fsdp ZeRO-2 the whole tp shard from
  forward to backward; ZeRO-3 the root group (embeddings and head, gathered for the whole forward and backward) and
  one block; gradients accumulating unsharded over micro-batches (fsdp with grad_accum > 1); DeepSpeed ZeRO-3 its
  prefetch bucket.
- `activations`: saved for backward, per micro-batch: each block's by the checkpointing mode (full: its input only;
  selective: every other block's input only), the embeddings' and the head's; times the micro-batches a pipeline
  rank holds at once (its schedule played out).
- `logits`: the loss's transients at the start of backward (the gradients of the fp32 log-softmax and of the logits),
  or one chunk's worth under full checkpointing.
- `peak`: the larger of the start of backward (parameters, optimizer, what gradients exist by then, gathered,
  activations, logits) and the optimizer step (parameters, gradients, optimizer).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.models import ModelConfig
from trainer.models.layers import loss_chunk_rows
from trainer.parallel.pipeline import PipelinePlan, balanced_split, plan_pipeline, stages_per_rank
from trainer.plan.params import (
    Param,
    fsdp_shard,
    head_cost,
    largest,
    local_numel,
    model_key,
    model_params,
    n_params,
    rank_params,
    root_and_block_numel,
    split_embedding_grads,
    stage_params,
    zero3_partition,
    zero12_partition,
)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
__all__ = ["Breakdown", "Layout", "Param", "estimate", "head_cost", "model_params", "n_params", "stage_params"]


@dataclass(frozen=True)
class Layout:
    """One way to run a config: engine and ZeRO stage, the (pp, dp, cp, tp) degrees, checkpointing,
    micro-batching."""

    engine: str = "ddp"
    zero_stage: int = 0
    offload: str = "none"
    dp: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual: int = 0
    activation_checkpointing: str = "none"
    micro_batch: int = 1
    grad_accum: int = 1
    precision: str = "fp32"
    pp_split: tuple[int, ...] | None = None
    cp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @classmethod
    def from_config(cls, cfg, world: int) -> Layout:
        p, t = cfg.parallel, cfg.train
        if world % (p.tp * p.pp * p.cp):
            names = "parallel.tp x parallel.pp" + (" x parallel.cp" if p.cp > 1 else "")
            raise UserError(
                f"--gpus {world} is not a multiple of {names} = {p.tp * p.pp * p.cp}: choose a GPU count they divide"
            )
        return cls(
            engine=p.engine,
            zero_stage=p.zero_stage,
            offload=p.offload,
            dp=world // (p.tp * p.pp * p.cp),
            cp=p.cp,
            tp=p.tp,
            pp=p.pp,
            pp_schedule=p.pp_schedule,
            pp_virtual=p.pp_virtual,
            activation_checkpointing=t.activation_checkpointing,
            micro_batch=t.micro_batch,
            grad_accum=t.grad_accum,
            precision=t.precision,
            pp_split=tuple(p.pp_split) if p.pp_split else None,
        )

    def overrides(self) -> list[str]:
        """The `section.key=value` overrides that run this layout."""
        out = [
            f"parallel.engine={self.engine}",
            f"parallel.zero_stage={self.zero_stage}",
            f"parallel.offload={self.offload}",
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.cp={self.cp}",
        ]  # every degree, so a config file's own values never leak into another layout
        if self.pp > 1:
            out.append(f"parallel.pp_schedule={self.pp_schedule}")
            if self.pp_virtual:
                out.append(f"parallel.pp_virtual={self.pp_virtual}")
            if self.pp_split:
                out.append(f"parallel.pp_split=[{','.join(map(str, self.pp_split))}]")
        out += [
            f"train.activation_checkpointing={self.activation_checkpointing}",
            f"train.micro_batch={self.micro_batch}",
            f"train.grad_accum={self.grad_accum}",
        ]
        return out

    def describe(self) -> str:
        zero = f" ZeRO-{self.zero_stage}" if self.zero_stage else ""
        off = " +offload" if self.offload != "none" else ""
        pp = f" pp{self.pp} {self.pp_schedule}" if self.pp > 1 else ""
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return (
            f"{self.engine}{zero}{off} dp{self.dp}{cp} tp{self.tp}{pp}, AC {self.activation_checkpointing}, "
            f"micro-batch {self.micro_batch} x {self.grad_accum}"
        )


_PLANS: dict[tuple, PipelinePlan | UserError] = {}


@functools.lru_cache(maxsize=1024)
def _balanced(n_layer: int, n_stages: int, head: float) -> list[int]:
    return balanced_split(n_layer, n_stages, head)


def pipeline_of(model_cfg: ModelConfig, layout: Layout, seq_len: int) -> PipelinePlan | None:
    """The trainer's own stage split and placement for the layout (UserError where the schedule cannot run); worked
    out once per model, pipeline and micro-batch count."""
    if layout.pp == 1:
        return None
    split = list(layout.pp_split) if layout.pp_split else None
    key = (model_key(model_cfg), seq_len, layout.pp, layout.pp_schedule, layout.pp_virtual, layout.pp_split)
    key += (layout.grad_accum,)
    if key not in _PLANS:
        try:
            n_stages = layout.pp * stages_per_rank(layout.pp_schedule, layout.pp_virtual)
            if split is None and n_stages <= model_cfg.n_layer:  # the default split, worked out once for every m
                split = _balanced(model_cfg.n_layer, n_stages, head_cost(model_cfg, seq_len))
            _PLANS[key] = plan_pipeline(
                layout.pp,
                layout.pp_schedule,
                layout.pp_virtual,
                split,
                model_cfg.n_layer,
                head_cost(model_cfg, seq_len),
                layout.grad_accum,
            )
        except UserError as e:
            _PLANS[key] = e
    if isinstance(_PLANS[key], UserError):
        raise UserError(str(_PLANS[key]))
    return _PLANS[key]


@dataclass
class Breakdown:
    """Bytes per rank of one category set, for the worst pp rank (`per_pp_rank` has them all)."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    gathered: int = 0
    activations: int = 0
    logits: int = 0
    transient: int = 0
    cpu: int = 0
    offloaded: dict = field(default_factory=dict)  # category -> bytes kept in CPU memory (offload=cpu)
    peak: int = 0
    peak_at: str = ""
    per_pp_rank: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """Its fields as a plain dict (a shallow copy: a search makes one per pp rank of thousands of layouts)."""
        return {**vars(self), "offloaded": dict(self.offloaded), "per_pp_rank": list(self.per_pp_rank)}


def stage_activations(
    model_cfg: ModelConfig, layout: Layout, seq_len: int, n_layers: int, first: bool, last: bool
) -> int:
    """Bytes one micro-batch saves for backward on a stage of `n_layers` blocks (with the embeddings when `first`,
    the head and loss when `last`): full checkpointing keeps each block's input only (and computes the head and loss
    in chunks), selective does so for every other block. Under context parallelism a rank holds seq_len / cp tokens,
    plus, in each block it does not checkpoint, the keys and values gathered over the whole sequence."""
    ac, cp = layout.activation_checkpointing, layout.cp
    ce = DTYPE_BYTES[layout.precision]
    saved = model_cfg.saved_bytes(layout.micro_batch, seq_len // cp, layout.tp, ce)
    chunk = ac == "full" and layout.tp == 1
    total = 0
    gathered_kv = cp_gathered_kv(model_cfg, layout, seq_len)
    for i in range(n_layers):
        checkpointed = ac == "full" or (ac == "selective" and i % 2 == 0)
        total += saved["block_input"] if checkpointed else saved["block"] + gathered_kv
    if first:
        total += saved["first"]
    if last:
        total += saved["last_chunked"] if chunk else saved["last"]
    return total


def cp_gathered_kv(model_cfg: ModelConfig, layout: Layout, seq_len: int) -> int:
    """Bytes of one block's keys and values gathered over the context-parallel ranks (0 without cp): the whole
    sequence's, of this rank's kv heads, saved for attention's backward beside the rank's own (which the block's
    count already holds)."""
    if layout.cp == 1:
        return 0
    kv_dim = getattr(model_cfg, "n_kv_heads", model_cfg.n_head) * model_cfg.head_dim
    return 2 * layout.micro_batch * seq_len * kv_dim // layout.tp * DTYPE_BYTES[layout.precision]


def zero3_gathered(mine: list[Param], tp: int, ce: int) -> int:
    """fsdp ZeRO-3 at the start of backward: the root group (embeddings, final norm, head: gathered for the whole
    forward and again from the start of backward) and one block (the one being differentiated)."""
    root, per_block = root_and_block_numel(mine, tp)
    return int(ce * (root + per_block))


def _in_flight(plan: PipelinePlan, layout: Layout, stage_act: list[int], stage_cost: list[float]) -> dict:
    """Per pp rank, the most activation bytes held at once and whether gradients exist by then: the schedule's
    actions played out with each stage's one micro-batch of activations."""
    from trainer.plan.schedule import play_steady

    costs = [{"F": c, "B": 2 * c, "I": c, "W": c} for c in stage_cost]
    return play_steady(layout.pp_schedule, layout.pp, layout.grad_accum, costs, [float(a) for a in stage_act])


def estimate(model_cfg: ModelConfig, layout: Layout, seq_len: int) -> Breakdown:
    """Per-rank bytes of a training step of `layout` (see the module docstring); the worst pp rank's."""
    plan = pipeline_of(model_cfg, layout, seq_len)
    stages = list(range(plan.n_stages)) if plan else [None]
    ranks = [plan.stages_of(r) for r in range(layout.pp)] if plan else [[None]]
    ce = DTYPE_BYTES[layout.precision]  # compute dtype
    acts, costs = [], []
    for stage in stages:
        layers = list(plan.layers(stage)) if plan else list(range(model_cfg.n_layer))
        first = stage in (None, 0)
        last = stage is None or stage == plan.n_stages - 1
        total = stage_activations(model_cfg, layout, seq_len, len(layers), first, last)
        acts.append(total)
        costs.append(len(layers) + (head_cost(model_cfg, seq_len) if last else 0.0))
    per_rank = []
    played = _in_flight(plan, layout, acts, costs) if plan else {"peak_held_bytes": [acts[0]]}
    for r, held_stages in enumerate(ranks):
        mine = rank_params(model_cfg, plan, r)
        # gradients from an earlier micro-batch exist when the rank holds the most activations
        grads_by_then = played["peak_after_backward"][r] if plan else layout.grad_accum > 1
        per_rank.append(
            _rank_bytes(
                model_cfg, layout, mine, played["peak_held_bytes"][r], grads_by_then, held_stages, plan, seq_len, ce
            )
        )
    worst = max(per_rank, key=lambda x: x.peak)
    worst.per_pp_rank = [x.as_dict() for x in per_rank]
    return worst


def _rank_bytes(
    model_cfg: ModelConfig,
    layout: Layout,
    mine: list[Param],
    activations: float,
    grads_by_then: bool,
    stages: list,
    plan: PipelinePlan | None,
    seq_len: int,
    ce: int,
) -> Breakdown:
    dp, tp = layout.dp * layout.cp, layout.tp  # cp ranks hold the parameters as dp ones do
    n_tp = local_numel(mine, tp)  # this rank's parameters before dp sharding
    out = Breakdown()
    last = plan is None or (plan.n_stages - 1) in stages
    b, s, v = layout.micro_batch, seq_len // layout.cp, model_cfg.padded_vocab_size  # s: this rank's tokens
    if last:
        chunk = loss_chunk_rows(v) if layout.activation_checkpointing == "full" and tp == 1 else 0
        rows = min(chunk, b * s) if chunk else b * s
        # at the loss's backward: the fp32 gradients of the log-softmax and of the logits (loss_parallel under tp and
        # a recomputed chunk hold one more vocab-wide tensor)
        out.logits = (3 if chunk or tp > 1 else 2) * rows * math.ceil(v / tp) * 4
    # backward's working set through one block: the MLP hidden's two gradients and a few residual-width ones (and a
    # pipeline stage's send and receive buffers), when no loss transient is larger
    h, f = model_cfg.d_model, model_cfg.d_ff
    out.transient = (2 * b * s * f + 5 * b * s * h) // tp * ce
    out.activations = int(activations)
    m = layout.grad_accum
    if layout.engine in ("ddp", "fsdp"):
        shard = n_tp if layout.engine == "ddp" else fsdp_shard(mine, tp, dp)
        out.parameters = 4 * shard
        out.gradients = 4 * shard
        if layout.engine == "ddp" and tp > 1:
            # an untied vocab- or position-parallel embedding's gradient is a shard of a whole-size tensor
            out.gradients += split_embedding_grads(mine, tp)
        out.optimizer = 8 * shard
        # ddp: the all-reduce buckets (dp > 1) or the gradients of earlier micro-batches; a pipeline rank's exist
        # only once it has run a backward
        buckets = layout.engine == "ddp" and dp > 1 and plan is None  # DDP's buckets hold them from the start
        grads_early = out.gradients if layout.engine == "ddp" and (buckets or grads_by_then) else 0
        if layout.engine == "fsdp":
            if plan is not None and m > 1:
                # torch's pipeline stages keep their gathered parameters and unsharded gradients over the step
                out.gathered = ce * n_tp + (4 * n_tp if grads_by_then else 0)
            elif layout.zero_stage == 2:
                out.gathered = ce * n_tp + (4 * n_tp if m > 1 else 0)
            else:
                out.gathered = zero3_gathered(mine, tp, ce) + (4 * n_tp if m > 1 else 0)
    else:
        grads_early = _deepspeed(out, model_cfg, layout, mine, n_tp)
    state = out.parameters + out.optimizer
    where = "start of backward"
    block_bytes = model_cfg.saved_bytes(b, s, tp, ce)["block"] + cp_gathered_kv(model_cfg, layout, seq_len)
    backward_start = state + grads_early + out.gathered + out.activations + max(out.logits, out.transient)
    if layout.activation_checkpointing != "none":  # a checkpointed block recomputed in backward, with its gradients
        recompute = state + grads_early + out.gathered + out.activations + block_bytes + out.transient
        if recompute > backward_start:
            backward_start, where = recompute, "a checkpointed block's recomputation"
    step = state + out.gradients
    out.peak = max(backward_start, step)
    out.peak_at = where if backward_start >= step else "optimizer step"
    return out


def _deepspeed(out: Breakdown, model_cfg: ModelConfig, layout: Layout, mine: list[Param], n: int) -> int:
    """DeepSpeed's ZeRO-1/2/3 buffers as its optimizers allocate them (the engine's generated config: reduce bucket
    d_model^2 elements, ZeRO-3 persistence threshold 10 d_model); returns the gradient bytes already held when
    backward starts."""
    dp = layout.dp
    pbytes = DTYPE_BYTES[layout.precision]
    bucket = model_cfg.d_model * model_cfg.d_model
    if layout.zero_stage == 3:
        # every parameter partitioned on its own; those under the threshold also kept whole on every rank
        part, whole_small = zero3_partition(mine, dp, 10 * model_cfg.d_model)
        out.parameters = pbytes * (part + whole_small)
        out.gradients = 4 * part + 4 * bucket  # the flat gradient partition (allocated once) and the reduce bucket
        out.optimizer = 12 * part  # fp32 master partition and the two moments
        # gathered parameters stay until their reuse distance passes stage3_max_reuse_distance (1e9): in practice the
        # whole model, up to stage3_max_live_parameters (1e9)
        out.gathered = pbytes * min(n - whole_small, 10**9)
        early = out.gradients
    else:
        # ZeRO-1/2: each weight-decay group flattened, padded to a multiple of 2 dp, split in dp partitions; the
        # gradient buffer holds every parameter that reaches into the rank's partition, whole
        part, most = zero12_partition(mine, dp)
        out.parameters = pbytes * n
        out.gradients = 4 * most
        out.optimizer = 12 * part
        early = 0  # allocated as backward reduces the first bucket, freed after the step
    if layout.offload == "cpu":
        # the optimizer step runs on the CPU: fp32 master, moments and the master's gradient there (ZeRO-3: also the
        # parameter partitions); ZeRO-1/2 also keep a fp32 gradient partition and a largest-parameter staging buffer
        # there, and on the device a partition-sized parameter buffer and a staging buffer
        staging = 4 * largest(mine)
        moved = {"optimizer": 16 * part}
        if layout.zero_stage == 3:
            moved["parameters"] = pbytes * part
            out.parameters -= pbytes * part
        else:
            moved["gradients"] = 4 * part + staging
            out.gradients = staging
            out.gathered = pbytes * part
        out.optimizer = 0
        out.offloaded = moved
        out.cpu = sum(moved.values())
    return early


def predict_run(cfg, model_cfg: ModelConfig, world: int) -> Breakdown | None:
    """The formula's per-rank bytes for the run `cfg` describes on `world` ranks (None where it has no answer, e.g.
    a layout the trainer will refuse anyway: the refusal is the trainer's to word)."""
    try:
        return estimate(model_cfg, Layout.from_config(cfg, world), cfg.data.seq_len)
    except UserError:
        return None


def device_memory(device: torch.device, local_ranks: int) -> tuple[int, str] | None:
    """(bytes, what) one rank may use: the GPU's memory, or on CPU the host's available memory over its ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"the GPU's {torch.cuda.get_device_name(device)}"
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
            return avail // max(1, local_ranks), f"this host's available memory over {local_ranks} rank(s)"
    return None
