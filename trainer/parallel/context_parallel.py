"""Context parallelism: every sequence split over the `cp` mesh axis, load-balanced, with keys and values gathered
along the sequence inside attention (the all-gather form of Llama 3's paper; exact on any device, CPU included).

With degree N the sequence is cut into 2N chunks and cp rank r holds chunks r and 2N-1-r: under a causal mask the
early chunks attend to few keys and the late ones to many, so every rank does the same attention work. Each rank
computes queries, keys and values for its own tokens only; attention all-gathers the keys and values of the whole
sequence (one collective for both, its gradient reduce-scattered in backward) and masks by global positions. Positions
(learned or rotary) are global; the loss is each rank's summed token loss, reduced with the data-parallel ones.

Parameters are replicated over cp as over dp: the fsdp engine shards them over the flattened (dp, cp) mesh and ddp
all-reduces their gradients over it (cp peers see other tokens of the same samples, so their gradients add up).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import UserError


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim -2 over `group` in rank order; backward reduce-scatters the gradient (every rank's
    queries attended to every rank's keys: their gradients add up on the rank that owns those keys)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
        ctx.group, ctx.degree = group, degree
        local = x.movedim(-2, 0).contiguous()
        out = local.new_empty((degree * local.shape[0], *local.shape[1:]))
        dist.all_gather_single(out, local, group=group)
        return out.movedim(0, -2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.movedim(-2, 0).contiguous()
        out = full.new_empty((full.shape[0] // ctx.degree, *full.shape[1:]))
        dist.reduce_scatter_single(out, full, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, -2), None, None


@functools.lru_cache(maxsize=64)
def _chunk_positions(rank: int, degree: int, t: int) -> torch.Tensor:
    """The global positions of cp rank `rank`'s `t` tokens: chunks `rank` and 2*degree-1-rank of size t/2."""
    c = t // 2
    first, second = rank * c, (2 * degree - 1 - rank) * c
    return torch.cat((torch.arange(first, first + c), torch.arange(second, second + c)))


class ContextParallel:
    """One rank's share of every sequence (trainer.models.layers.SequenceShard): set on the model's attention
    modules by `apply_context_parallel`, active only inside `engine.train_step`/`eval_step` (sampling and plain
    forwards see whole sequences)."""

    def __init__(self, group: dist.ProcessGroup, degree: int, rank: int) -> None:
        self.group, self.degree, self.rank = group, degree, rank
        self.active = False
        self._on_device: dict = {}

    def _cached(self, key: tuple, make) -> torch.Tensor:
        if key not in self._on_device:
            self._on_device[key] = make()
        return self._on_device[key]

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        return self._cached(("q", t, str(device)), lambda: _chunk_positions(self.rank, self.degree, t).to(device))

    def key_positions(self, t: int, device: torch.device) -> torch.Tensor:
        return self._cached(
            ("k", t, str(device)),
            lambda: torch.cat([_chunk_positions(r, self.degree, t) for r in range(self.degree)]).to(device),
        )

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(x, self.group, self.degree)

    def shard(self, batch: dict) -> dict:
        """This rank's tokens of a micro-batch's (B, T) tensors (token ids, labels), before they reach the device."""
        t = batch["input_ids"].shape[-1]
        index = _chunk_positions(self.rank, self.degree, t // self.degree)
        return {k: (v.index_select(-1, index) if v.dim() == 2 else v) for k, v in batch.items()}

    @contextlib.contextmanager
    def sharding(self):
        """Attention gathers over cp and positions are global while this is open (forward and backward)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    """Hands `cp` to every module that takes a sequence shard (the model, for its positions, and its attention)."""
    for module in model.modules():
        if hasattr(module, "seq_shard"):
            module.seq_shard = cp


def check_cp(cp: int, seq_len: int, tp: int, arch: str, engine: str, pp: int) -> None:
    """What context parallelism runs with, refused in one line before any process group exists."""
    if cp == 1:
        return
    if arch == "bert":
        raise UserError(
            f"parallel.cp={cp} splits causal sequences (gpt, llama); model.arch=bert attends both ways: use "
            f"parallel.cp=1"
        )
    if engine == "deepspeed":
        raise UserError(f"parallel.cp={cp} runs with parallel.engine=fsdp or ddp, not deepspeed: change the engine")
    if pp > 1:
        raise UserError(f"parallel.cp={cp} does not combine with pipeline parallelism (parallel.pp={pp}) yet")
    if seq_len % (2 * cp * tp):
        raise UserError(
            f"parallel.cp={cp} needs data.seq_len divisible by 2 x cp{' x tp' if tp > 1 else ''} = {2 * cp * tp} "
            f"(each rank holds two equal chunks of every sequence); data.seq_len={seq_len}: change it or parallel.cp"
        )
