"""GPT-2 in plain torch.nn: pre-LayerNorm decoder blocks, learned positions, LM head tied to the token embedding.

Attention and MLP live in `trainer.models.layers` (shared with BERT, names chosen for tensor parallelism).
`trainer.export` maps these names to Hugging Face's GPT2LMHeadModel layout (fused, transposed Conv1D `c_attn`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.models.gpt.config import GPTConfig
from trainer.models.layers import (
    INIT_STD,
    MLP,
    SelfAttention,
    SequenceShard,
    VocabHead,
    check_seq_len,
    head_loss_sum,
    init_weights_,
    positions_of,
)


class Block(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)). Takes and returns only the hidden state (checkpoint-wrappable)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg, causal=True)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg, gelu_approximate="tanh")
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """GPT-2 language model: `forward(input_ids (B, T)) -> logits (B, T, vocab_size)`, or with `labels` (B, T) the
    summed next-token cross-entropy over the targets (labels != -100), without returning the logits. A padded
    vocabulary's extra rows (model.vocab_multiple) are never projected (VocabHead): the logits have vocab_size columns.

    A pipeline stage is this model with the parts of `PIPELINE_FIRST` or `PIPELINE_LAST` set to None: without the
    embeddings it takes the previous stage's hidden state (B, T, d_model), without the head it returns its own."""

    PIPELINE_FIRST, PIPELINE_LAST = ("tok_emb", "pos_emb"), ("ln_f", "lm_head")

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        # keyed by the global layer index: a process holding only some blocks keeps their names
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = VocabHead(cfg)
        self.loss_chunk_rows = 0  # > 0: the head and loss in checkpointed chunks of this many tokens (head_loss_sum)
        self.seq_shard: SequenceShard | None = None  # context parallelism: this rank's positions of each sequence
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Make the LM head share the token embedding's Parameter (call again after replacing either); a pipeline
        stage holding one of them only keeps its own copy."""
        if self.lm_head is not None and self.tok_emb is not None:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, unit LayerNorms; residual projections scaled by 1/sqrt(2L).

        Public so a model built on the meta device can be initialised after `to_empty`, which unties the LM head
        from the embedding (meta -> real device makes new Parameters); this re-ties it first.
        """
        self.tie_weights()
        resid_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        init_weights_(
            self, self.lm_head, lambda name: resid_std if name.endswith(("attn.wo", "mlp.fc_out")) else INIT_STD
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) with T <= max_seq_len -> next-token logits (B, T, vocab_size); with labels (B, T), the
        summed token loss (a scalar). A pipeline stage after the first takes a hidden state instead of token ids."""
        x = input_ids
        if self.tok_emb is not None:
            t = input_ids.shape[-1]
            check_seq_len(t, self.config.max_seq_len, self.seq_shard)
            positions = positions_of(t, input_ids.device, self.seq_shard)
            x = self.emb_dropout(self.tok_emb(input_ids) + self.pos_emb(positions))
        for block in self.blocks.values():
            x = block(x)
        return x if self.lm_head is None else self.output(x, labels)

    def output(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and LM head, then the loss when `labels` are given: one unit, so that compiling it fuses the
        (tokens x vocab) log-softmax and its gradient with the head instead of writing them out between kernels."""
        x = self.ln_f(x)
        return self.lm_head(x) if labels is None else head_loss_sum(self.lm_head, x, labels, self.loss_chunk_rows)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after `input_ids` (B, T); returns (B, T + max_new_tokens).

        The context is cropped to the last max_seq_len tokens. temperature <= 0 means greedy decoding.
        No KV cache: meant for samples during and after training, not for serving.
        """
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_seq_len :])[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            ids = torch.cat([ids, next_id.to(ids.dtype)], dim=1)
        return ids
