"""A Llama-style decoder in plain torch.nn: RMSNorm pre-norm blocks, rotary positions (RoPE, optionally with Llama 3's
frequency scaling), grouped-query attention through scaled_dot_product_attention, SwiGLU MLP, no biases; the LM head
tied to the token embedding or not; optional QK-norm (Qwen3). Numerically it follows Hugging Face's LlamaForCausalLM
and Qwen3ForCausalLM (rotate-half RoPE, RMSNorm in fp32).

Names are chosen for tensor parallelism: `wq`/`wk`/`wv`, `mlp.gate`/`mlp.up` column-parallel, `wo`/`mlp.down`
row-parallel; attention infers its local head counts from the projection widths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.layers import (
    SequenceShard,
    VocabHead,
    causal_attention,
    check_seq_len,
    head_loss_sum,
    init_weights_,
    positions_of,
)
from trainer.models.llama.config import LlamaConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as Hugging Face's Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(cfg: LlamaConfig, device: torch.device) -> torch.Tensor:
    """The head_dim / 2 rotary inverse frequencies, with Llama 3's scaling when configured: wavelengths longer than
    the original context / low_freq_factor are slowed by `factor`, those shorter than / high_freq_factor kept, and
    the band between interpolated smoothly."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def rotary(cfg: LlamaConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, head_dim) of the (T,) `positions`, in fp32."""
    angles = torch.outer(positions.to(torch.float32), rope_frequencies(cfg, positions.device))
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout: x (B, H, T, D) with cos/sin (T, D), the two halves of D paired."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query self-attention: n_head query heads share n_kv_heads key/value heads in groups; causal. It makes
    its own rotary tables (a few KiB): its only input is the hidden state, as tensor parallelism's plans expect."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.seq_shard: SequenceShard | None = None  # context parallelism: global positions, keys gathered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        b, t, _ = x.shape
        cos, sin = (r.to(x.dtype) for r in rotary(self.config, positions_of(t, x.device, self.seq_shard)))
        # -1 heads: the local counts, n_head / tp and n_kv_heads / tp when the projections are column-sharded
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        p = self.dropout if self.training else 0.0
        y = causal_attention(q, k, v, p, self.seq_shard, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """x + attn(attn_norm(x)), then + mlp(mlp_norm(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Llama(nn.Module):
    """`forward(input_ids (B, T)) -> logits (B, T, vocab_size)`, or with `labels` (B, T) the summed next-token
    cross-entropy over the targets (labels != -100). Padding rows of the vocabulary are never projected (see GPT)."""

    PIPELINE_FIRST, PIPELINE_LAST = ("tok_emb",), ("norm", "lm_head")  # a stage without them: see GPT

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        # keyed by the global layer index: a process holding only some blocks keeps their names
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = VocabHead(cfg)
        self.loss_chunk_rows = 0  # > 0: the head and loss in checkpointed chunks of this many tokens (head_loss_sum)
        self.seq_shard: SequenceShard | None = None  # context parallelism (set from outside)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """With tie_embeddings, make the LM head share the token embedding's Parameter (again after replacing either)."""
        if self.config.tie_embeddings and self.lm_head is not None and self.tok_emb is not None:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, 0.02) linear weights and embeddings (Hugging Face's initializer_range), unit RMSNorms. Public so a
        model built on the meta device can be initialised after `to_empty` (which unties the head: re-tied first)."""
        self.tie_weights()
        init_weights_(self, self.lm_head if self.config.tie_embeddings else None)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = input_ids  # a pipeline stage after the first: the previous stage's hidden state
        if self.tok_emb is not None:
            check_seq_len(input_ids.shape[-1], self.config.max_seq_len, self.seq_shard)
            x = self.emb_dropout(self.tok_emb(input_ids))
        for block in self.blocks.values():
            x = block(x)
        return x if self.lm_head is None else self.output(x, labels)

    def output(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and LM head, then the loss when `labels` are given (one unit to compile, as GPT's)."""
        x = self.norm(x)
        return self.lm_head(x) if labels is None else head_loss_sum(self.lm_head, x, labels, self.loss_chunk_rows)
