"""The pipeline engine: the model's layers split into stages over the `pp` mesh axis and run by a
`torch.distributed.pipelining` schedule; within a stage, tensor parallelism on `tp` and FSDP2 (ZeRO-2/3) on `dp`
exactly as the fsdp engine applies them (or nothing on dp = 1 with parallel.engine=ddp).

A step is the schedule's step over the step's micro-batches (train.grad_accum): the last stage computes each
micro-batch's summed token loss in its forward (labels reach every stage as a keyword argument; only the last uses
them) and the schedule backpropagates it divided by the global batch's target tokens, unscaled by the micro-batch
count (scale_grads=False): the same contract as every engine. FSDP reduces gradients over dp on the last backward of
each stage, as the schedule drives it.

A tied embedding / LM head (GPT-2, BERT, small Llama presets) spans the first and the last stage. As Megatron does,
the last stage holds its own copy of the matrix, initialised to the same values, not decayed (an embedding), and
before every update the two copies' gradients are summed between those two stages: both then take the same update
and stay equal. The copy counts once in the gradient norm, which is summed over the stages, so every rank takes the
same clip and skip decision.

Evaluation and samples run the stages in order with point-to-point sends (the schedule's shapes are the training
micro-batch's); the last stage computes and the results reach every stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch._functorch.config
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining
from torch.distributed.tensor import DTensor

from trainer.engines.base import (
    DTYPES,
    LossScaler,
    load_sharded,
    local_numel,
    optimizer_step,
    require_dcp,
    save_sharded,
    unique_params,
)
from trainer.engines.fsdp import shard_model
from trainer.models.layers import token_loss_sum
from trainer.optim import OptimizerSettings, build_optimizer
from trainer.parallel import ParallelDims, all_reduce_sum, full_value, loss_context, unwrapped
from trainer.parallel.pipeline import SCHEDULES, SPLIT_BACKWARD, PipelinePlan, materialize_stages, stage_module


def tied_names(model: nn.Module) -> dict[str, str]:
    """Parameter names that alias another (a tied LM head: {"lm_head.weight": "tok_emb.weight"})."""
    seen: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return aliases


class PipelineEngine:
    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        prepare: Callable[[nn.Module], nn.Module],
        *,
        plan: PipelinePlan,
        data_parallel: str,
        micro_batches: int,
        dims: ParallelDims,
        device: torch.device,
        precision: str,
        grad_clip: float,
        optim: OptimizerSettings,
        seed: int,
        zero_stage: int,
        load=None,
    ) -> None:
        self.name, self.zero_stage = data_parallel, zero_stage
        self.plan, self.dims, self.device = plan, dims, device
        self.dtype = DTYPES[precision]
        self.autocast = data_parallel != "fsdp" and precision != "fp32"  # FSDP casts parameters itself
        self.grad_clip = grad_clip
        if plan.schedule in SPLIT_BACKWARD:
            torch._functorch.config.donated_buffer = False  # see SPLIT_BACKWARD
        with torch.device("meta"):
            whole = make_model()
        self.aliases = tied_names(whole)
        self.stage_ids = plan.stages_of(dims.pp_rank)
        self.parts = [prepare(stage_module(whole, plan, s)) for s in self.stage_ids]
        if data_parallel == "fsdp":
            for part in self.parts:
                shard_model(part, dims, zero_stage, precision)
        materialize_stages(whole, self.parts, device, seed)
        if load is not None:  # a pretrained checkpoint (model.init_from): each stage reads what it holds
            for part in self.parts:
                load(part, aliases=self.aliases)
        # the tied head's copy on the last stage (and the embedding it copies, on the first)
        self.tied: list[tuple[nn.Parameter, ...]] = []
        self.copies: frozenset[int] = frozenset()
        if self.aliases:
            self._tie_group()
        self.optimizers = [build_optimizer(part, optim, no_decay=self.copies) for part in self.parts]
        self.scaler = LossScaler(enabled=precision == "fp16", device=device)
        cls_name, _, _ = SCHEDULES[plan.schedule]
        stages = [
            pipelining.PipelineStage(part, s, plan.n_stages, device, group=dims.group("pp"))
            for s, part in zip(self.stage_ids, self.parts)
        ]
        schedule_cls = getattr(pipelining, cls_name)
        single = issubclass(schedule_cls, pipelining.schedules.PipelineScheduleSingle)
        self.schedule = schedule_cls(
            stages[0] if single else stages, n_microbatches=micro_batches, loss_fn=self._loss, scale_grads=False
        )
        self._targets = torch.ones((), device=device)
        self._losses: list[torch.Tensor] = []
        mine = torch.tensor([float(self._state_bytes())], device=device)
        every = [torch.zeros_like(mine) for _ in range(plan.pp)]
        dist.all_gather(every, mine, group=dims.group("pp"))
        self.stage_bytes = [int(b) for b in torch.cat(every).tolist()]  # per pp rank, for the start record

    # ---- setup -----------------------------------------------------------------------------------------------
    def _tie_group(self) -> None:
        """Finds this rank's halves of each tied pair and the process group that sums their gradients: the pp ranks
        of the first and the last stage, for each (dp, tp) coordinate (made collectively: every rank makes them all)."""
        first, last = self.plan.stage_rank[0], self.plan.stage_rank[-1]
        self.tie_pg = None
        if first != last:
            mesh = self.dims.mesh.mesh  # (pp, dp, cp, tp) global ranks; cp = 1 under a pipeline
            for d in range(self.dims.dp):
                for t in range(self.dims.tp):
                    ranks = sorted({int(mesh[first, d, 0, t]), int(mesh[last, d, 0, t])})
                    group = dist.new_group(ranks)
                    if self.dims.rank in ranks:
                        self.tie_pg = group
        held = {}
        for part in self.parts:
            for name, p in part.named_parameters():
                held[unwrapped(name)] = p
        for alias, name in self.aliases.items():
            pair = tuple(held[n] for n in (name, alias) if n in held)
            if pair:
                self.tied.append(pair)
        self.copies = frozenset(id(held[alias]) for alias in self.aliases if alias in held)

    # ---- the step --------------------------------------------------------------------------------------------
    def _loss(self, loss_sum: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function on the last stage: its forward already returned the summed token loss. (The
        schedule's first step also calls it on a metadata-inference pass: only the step's last m calls count.)"""
        loss_sum = full_value(loss_sum)
        self._losses.append(loss_sum.detach().float())
        return self.scaler.scale_loss(loss_sum / self._targets)

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def _precision(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()

    def train_step(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        local_targets = sum(int((b["labels"] != -100).sum()) for b in batches)
        targets = torch.tensor([float(local_targets)], device=self.device)
        self._targets = all_reduce_sum(targets, self.dims, "dp")[0]
        self._losses = []
        ids = torch.cat([b["input_ids"] for b in batches]).to(self.device)
        labels = torch.cat([b["labels"] for b in batches]).to(self.device)
        with loss_context(self.dims.tp), self._precision():
            self.schedule.step(ids, target=labels, labels=labels, return_outputs=False)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for loss in self._losses[-len(batches) :]:  # not on stages other than the last: they hold 0
            loss_sum += loss
        return loss_sum, self._targets

    def step(self, lr: float, loss_finite: torch.Tensor | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        self._sum_tied_grads()
        params = [p for part in self.parts for p in unique_params(part)]
        return optimizer_step(
            params,
            self.optimizers,
            self.scaler,
            grad_clip=self.grad_clip,
            lr=lr,
            loss_finite=loss_finite,
            norm_across=self.dims.group("pp"),
            not_in_norm=self.copies,
        )

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        """Both copies of a tied matrix get the sum of their gradients (as the one shared parameter of a single
        process would)."""
        for pair in self.tied:
            for p in pair:  # the same layout on both sides (tp leaves an embedding's gradient replicated)
                if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                    p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            grads = [p.grad for p in pair]
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            total = local[0] if len(local) == 1 else local[0].add_(local[1])
            if self.tie_pg is not None:
                dist.all_reduce(total, group=self.tie_pg)
            for g in local[1:]:
                g.copy_(total)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def _send(self, x: torch.Tensor, to: int) -> None:
        header = torch.zeros(8, dtype=torch.int64)
        header[0], header[1] = list(DTYPES.values()).index(x.dtype), x.dim()
        header[2 : 2 + x.dim()] = torch.tensor(x.shape)
        dist.send(header.to(self.device), group=self.dims.group("pp"), group_dst=to)
        dist.send(x.contiguous(), group=self.dims.group("pp"), group_dst=to)

    def _recv(self, frm: int) -> torch.Tensor:
        header = torch.zeros(8, dtype=torch.int64, device=self.device)
        dist.recv(header, group=self.dims.group("pp"), group_src=frm)
        dtype, ndim = list(DTYPES.values())[int(header[0])], int(header[1])
        x = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=self.device)
        dist.recv(x, group=self.dims.group("pp"), group_src=frm)
        return x

    def _run_stages(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Every stage in order on one batch: the last stage's output on its rank, None elsewhere."""
        owner, me = self.plan.stage_rank, self.dims.pp_rank
        x = input_ids
        for s in range(self.plan.n_stages):
            if owner[s] != me:
                continue
            if s > 0 and owner[s - 1] != me:
                x = self._recv(owner[s - 1])
            with self._precision():
                x = self.parts[self.stage_ids.index(s)](x)
            if s + 1 < self.plan.n_stages and owner[s + 1] != me:
                self._send(x, owner[s + 1])
        return x if owner[-1] == me else None

    def _from_last(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, group=self.dims.group("pp"), group_src=self.plan.stage_rank[-1])
        return t

    @torch.no_grad()
    def eval_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = batch["labels"].to(self.device)
        mask = labels != -100
        totals = torch.zeros(2, dtype=torch.float32, device=self.device)
        with loss_context(self.dims.tp):
            logits = self._run_stages(batch["input_ids"].to(self.device))
            if logits is not None:
                totals[0] = full_value(token_loss_sum(logits, labels))
                totals[1] = ((full_value(logits).argmax(-1) == labels) & mask).sum()
        self._from_last(totals)
        return totals[0], mask.sum(), totals[1]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the whole model on every stage (for samples: gathered over tp and sent from the last stage)."""
        logits = self._run_stages(input_ids.to(self.device))
        vocab = self.parts[0].config.vocab_size  # under tp the logits have the padding columns too (-inf): dropped
        shape = (*input_ids.shape, vocab)
        out = full_value(logits)[..., :vocab].float() if logits is not None else torch.empty(shape, device=self.device)
        return self._from_last(out.contiguous())

    # ---- state -----------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        save_sharded(
            directory, list(zip(self.parts, self.optimizers)), {"scaler": self.scaler.state_dict()}, self.aliases
        )

    def load(self, directory: Path) -> None:
        require_dcp(directory)
        parts = list(zip(self.parts, self.optimizers))
        extra = load_sharded(directory, parts, {"scaler": self.scaler.state_dict()}, self.aliases)
        self.scaler.load_state_dict(extra["scaler"])

    def _state_bytes(self) -> int:
        """This rank's model state: 16 bytes per local parameter with fp32 AdamW; ZeRO-2 also holds its stages'
        gathered parameters."""
        n_local = sum(local_numel(p) for part in self.parts for p in unique_params(part))
        gathered = n_local * self.dims.dp if self.name == "fsdp" and self.zero_stage == 2 else 0
        return 16 * n_local + 4 * gathered

    def layout(self) -> dict:
        """The model state of this rank and of each pp rank (the stages it holds: `pp_stage_ranks`), the schedule and
        the layers of each stage."""
        return {
            "engine": self.name,
            "zero_stage": self.zero_stage,
            "offload": "none",
            "model_state_bytes": self.stage_bytes[self.dims.pp_rank],
            "pp": self.plan.pp,
            "pp_schedule": self.plan.schedule,
            "pp_split": self.plan.describe(),
            "pp_stage_ranks": list(self.plan.stage_rank),
            "pp_rank_model_state_bytes": self.stage_bytes,
        }
