"""Context parallelism: every sequence split over the `cp` mesh axis, load-balanced, with keys and values gathered
along the sequence inside attention (the all-gather form of Llama 3's paper; exact on any device, CPU included).

With degree N the sequence is cut into 2N chunks and cp rank r holds chunks r and 2N-1-r: under a causal mask the
early chunks attend to few keys and the late ones to many, so every rank does the same attention work. Each rank
computes queries, keys and values for its own tokens only; attention all-gathers the keys and values of the whole
sequence (one collective for both, its gradient reduce-scattered in backward), and each query chunk attends to the
keys before it in full and to its own chunk causally (`block_causal`: no mask is built). Positions (learned or
rotary) are global; the loss is each rank's summed token loss, reduced with the data-parallel ones.

Parameters are replicated over cp as over dp: the fsdp engine shards them over the flattened (dp, cp) mesh and ddp
all-reduces their gradients over it (cp peers see other tokens of the same samples, so their gradients add up).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from trainer.errors import UserError
from trainer.models import family


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


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU flash attention's forward: (output, log-sum-exp of each query's scores, fp32). Grouped-query heads are
    taken as they are."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse


class _BlockCausalAttention(torch.autograd.Function):
    """Causal attention of a rank's two query chunks (global chunk indices `chunks`, each c = t/2 tokens) over the
    whole sequence's keys and values in order, with no mask: chunk j attends to keys [0, j*c) in full and to its own
    chunk [j*c, (j+1)*c) causally, two flash-kernel calls whose outputs are merged by their log-sum-exps (as ring
    attention merges its blocks). Backward runs the kernel's backward on each block with the MERGED output and
    log-sum-exp, which makes each block's softmax the global one: the gradients are exact. Saved: q, k, v, the
    output and the log-sum-exps (linear in the sequence; no (t x T) tensor ever exists)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: tuple[int, int]) -> torch.Tensor:
        c = q.shape[-2] // 2
        outs, lses = [], []
        for i, j in enumerate(chunks):
            qi = q[..., i * c : (i + 1) * c, :]
            parts = [_flash(qi, k[..., j * c : (j + 1) * c, :], v[..., j * c : (j + 1) * c, :], True)]
            if j > 0:
                parts.append(_flash(qi, k[..., : j * c, :], v[..., : j * c, :], False))
            acc = torch.promote_types(q.dtype, torch.float32)  # merged in fp32 (or the inputs' wider type)
            lse = torch.logsumexp(torch.stack([p[1].to(acc) for p in parts]), dim=0)
            out = sum(p[0].to(acc) * torch.exp(p[1].to(acc) - lse).unsqueeze(-1) for p in parts)
            outs.append(out.to(q.dtype))
            lses.append(lse.to(parts[0][1].dtype))
        out, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
        ctx.chunks = chunks
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        c = q.shape[-2] // 2
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i, j in enumerate(ctx.chunks):
            rows = slice(i * c, (i + 1) * c)
            gi, qi, oi = (x[..., rows, :].contiguous() for x in (grad, q, out))
            li = lse[..., rows].contiguous()
            blocks = [(slice(j * c, (j + 1) * c), True)] + ([(slice(0, j * c), False)] if j > 0 else [])
            for keys, causal in blocks:
                kb, vb = k[..., keys, :].contiguous(), v[..., keys, :].contiguous()
                g_q, g_k, g_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    gi, qi, kb, vb, oi, li, 0.0, causal
                )
                dq[..., rows, :] += g_q
                dk[..., keys, :] += g_k
                dv[..., keys, :] += g_v
        return dq, dk, dv, None


def block_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: tuple[int, int],
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
    flash: bool | None = None,
) -> torch.Tensor:
    """Causal attention of two query chunks q (B, H, t, D), at global chunk indices `chunks` of size t/2, over the
    whole sequence's k, v (B, H_kv, T, D) in order. `flash` (default: on CPU without dropout) merges flash-kernel
    blocks (`_BlockCausalAttention`); otherwise each chunk is a lower-right causal attention over the keys up to its
    end (CUDA's kernels run it without a mask; on CPU torch materialises it)."""
    if flash is None:
        flash = q.device.type == "cpu" and dropout_p == 0.0
    if flash:
        return _BlockCausalAttention.apply(q, k, v, chunks)
    c = q.shape[-2] // 2
    out = []
    for i, j in enumerate(chunks):
        qi, end = q[..., i * c : (i + 1) * c, :], (j + 1) * c
        out.append(
            F.scaled_dot_product_attention(
                qi,
                k[..., :end, :],
                v[..., :end, :],
                attn_mask=causal_lower_right(c, end),
                dropout_p=dropout_p,
                enable_gqa=enable_gqa,
            )
        )
    return torch.cat(out, dim=-2)


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

    def natural_order(self, t: int, device: torch.device) -> torch.Tensor:
        """The index that puts the gathered keys (rank by rank, each rank's two chunks) in sequence order."""

        def make() -> torch.Tensor:
            held = torch.cat([_chunk_positions(r, self.degree, t) for r in range(self.degree)])
            return torch.argsort(held).to(device)

        return self._cached(("order", t, str(device)), make)

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, enable_gqa: bool
    ) -> torch.Tensor:
        """Keys and values of every rank gathered (one collective for both, in sequence order), then each of this
        rank's two query chunks attends causally to the keys up to its own end. No mask is ever made: on CPU without
        dropout the blocks go through the flash kernel with their log-sum-exps merged (`_BlockCausalAttention`);
        elsewhere each chunk is a lower-right causal attention, which CUDA's flash and memory-efficient kernels run
        without materialising it."""
        t = q.shape[-2]
        kv = self.gather(torch.cat((k, v))).index_select(-2, self.natural_order(t, q.device))
        k, v = kv.chunk(2)
        return block_causal(q, k, v, (self.rank, 2 * self.degree - 1 - self.rank), dropout_p, enable_gqa)

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
    if family(arch).objective != "causal":
        raise UserError(
            f"parallel.cp={cp} splits causal sequences (gpt, llama); model.arch={arch} attends both ways: use "
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
