"""The layers GPT and BERT share: multi-head self-attention and the two-layer MLP.

Names are chosen for tensor parallelism: `wq`/`wk`/`wv` and `fc_in` are column-parallel, `wo` and `fc_out`
row-parallel (Y = XW, W = [W_1 ... W_p] split over heads / hidden units). Attention infers the number of local heads
from the projection width, so it runs unchanged when those layers are sharded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.errors import UserError
from trainer.models.family import ModelConfig

INIT_STD = 0.02


class SequenceShard(Protocol):
    """Context parallelism as a model sees it (set from outside on the model and its attention modules as
    `seq_shard`; trainer/parallel/context_parallel.py): while `active`, this rank holds `degree`-th of every sequence,
    load-balanced, and attention gathers the keys and values of the whole sequence from the ranks sharing it."""

    active: bool
    degree: int

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        """The global positions of this rank's `t` tokens."""
        ...

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, enable_gqa: bool
    ) -> torch.Tensor:
        """Causal attention of this rank's queries (B, H, t, D) over the keys and values of every rank."""
        ...


def sharded(shard: SequenceShard | None) -> bool:
    return shard is not None and shard.active


def positions_of(t: int, device: torch.device, shard: SequenceShard | None) -> torch.Tensor:
    """The global positions of a (local) sequence of `t` tokens: 0..t-1, or this rank's under context parallelism."""
    return shard.positions(t, device) if sharded(shard) else torch.arange(t, device=device)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    shard: SequenceShard | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal scaled_dot_product_attention of q (B, H, t, D) over k, v (B, H_kv, t, D); under context parallelism,
    over the keys and values of the whole sequence at global positions (the shard's)."""
    if not sharded(shard):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=enable_gqa)
    return shard.attention(q, k, v, dropout_p, enable_gqa)


class SelfAttention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention; causal for GPT, bidirectional with an optional
    boolean key mask `attn_mask` (B, 1, 1, T), True where a key is visible, for BERT. Output dropout is the caller's."""

    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.causal = causal
        self.wq = nn.Linear(cfg.d_model, cfg.d_model)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model)
        self.seq_shard: SequenceShard | None = None  # context parallelism (causal only)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        b, t, _ = x.shape
        # -1 heads: the local head count, which is n_head / tp when wq/wk/wv are column-sharded.
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if self.causal:
            y = causal_attention(q, k, v, p, self.seq_shard)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class VocabHead(nn.Linear):
    """The projection onto the vocabulary (LM head, MLM decoder) of a model whose embedding has `padded_vocab_size`
    rows, of which the first `vocab_size` are tokens (model.vocab_multiple). Only the token rows are projected:
    the logits have vocab_size columns, so a padding row never takes a share of the softmax, an argmax or a sample,
    and no gradient reaches it. Under tensor parallelism the weight is sharded over all the rows and cannot be cut:
    the plan sets `mask` (trainer/models/tp_plans.py), every row is projected and each rank sets the padding columns
    of its vocab shard to -inf (the logits then have padded_vocab_size columns)."""

    def __init__(self, cfg: ModelConfig, bias: bool = False) -> None:
        super().__init__(cfg.d_model, cfg.padded_vocab_size, bias=bias)
        self.vocab_size = cfg.vocab_size
        self.mask: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., vocab_size) logits ((..., padded_vocab_size) under tensor parallelism)."""
        n = self.vocab_size
        if self.out_features == n:
            return super().forward(x)
        if self.mask is not None:
            return self.mask(super().forward(x), n)
        return F.linear(x, self.weight[:n], None if self.bias is None else self.bias[:n])


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (in fp32) over the target tokens (labels != -100). Under tensor parallelism `logits` is
    sharded over the vocabulary and this runs inside `loss_parallel` (the engine's micro-batch context), never
    gathering them."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")


def head_loss_sum(
    head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 0
) -> torch.Tensor:
    """`token_loss_sum(head(x), labels)`. With `chunk_rows`, computed that many tokens at a time, each chunk
    checkpointed: a chunk's logits are dropped once its loss is taken and made again, one chunk at a time, in
    backward. The (tokens x vocab) logits, their fp32 log-softmax and its gradient are then never whole in memory,
    for one more forward product of the head per token."""
    if not chunk_rows:
        return token_loss_sum(head(x), labels)
    x, labels = x.flatten(0, -2), labels.flatten()

    def chunk_loss(xc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(head(xc), yc)

    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], chunk_rows):
        total = total + checkpoint(chunk_loss, x[i : i + chunk_rows], labels[i : i + chunk_rows], use_reentrant=False)
    return total


def loss_chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk of `head_loss_sum`: about 32 MiB of fp32 logits, and never fewer than 128 rows."""
    return max(128, 2**23 // vocab_size)


class MLP(nn.Module):
    """d_model -> d_ff -> GELU -> d_model; GPT-2 uses the tanh approximation of GELU, BERT the exact (erf) one."""

    def __init__(self, cfg: ModelConfig, gelu_approximate: str) -> None:
        super().__init__()
        self.gelu_approximate = gelu_approximate
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model), before the output dropout and residual."""
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.gelu_approximate))


def check_seq_len(t: int, max_seq_len: int, shard: SequenceShard | None = None) -> None:
    """`t` local tokens (of `degree` times as many under context parallelism) fit the model's positions."""
    t = t * shard.degree if sharded(shard) else t
    if t > max_seq_len:
        raise UserError(
            f"sequence length {t} exceeds model.max_seq_len={max_seq_len}; "
            f"shorten data.seq_len or raise model.max_seq_len"
        )


@torch.no_grad()
def init_weights_(
    model: nn.Module, tied_head: nn.Linear, std_for: Callable[[str], float] = lambda name: INIT_STD
) -> None:
    """N(0, std) linear weights (`std_for(module name)`) and embeddings, zero biases, unit LayerNorms.

    The tied head's weight is the token embedding's, so it is initialised once, as an embedding."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module is not tied_head:
                nn.init.normal_(module.weight, mean=0.0, std=std_for(name))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
