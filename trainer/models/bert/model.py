"""BERT for masked-language modelling in plain torch.nn, matching the original / Hugging Face BertForMaskedLM.

Word + position + token-type embeddings -> LayerNorm -> dropout; post-LayerNorm encoder layers; MLM head
(dense -> GELU -> LayerNorm -> decoder tied to the word embedding, with its own bias). No pooler, as BertForMaskedLM.
Layer names mirror `trainer.models.gpt` for tensor parallelism (`wq`/`wk`/`wv`/`fc_in` column-parallel,
`wo`/`fc_out` row-parallel); `trainer.export` maps them to Hugging Face names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.bert.config import BERTConfig
from trainer.models.layers import MLP, SelfAttention, VocabHead, check_seq_len, head_loss_sum, init_weights_


class Block(nn.Module):
    """Post-LayerNorm encoder layer: x = ln_attn(x + attn(x)); x = ln_mlp(x + mlp(x))."""

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg, causal=False)
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg, gelu_approximate="none")
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); `attn_bias` as in `SelfAttention`."""
        x = self.ln_attn(x + self.dropout(self.attn(x, attn_bias)))
        return self.ln_mlp(x + self.dropout(self.mlp(x)))


class MLMHead(nn.Module):
    """The transform before the tied decoder: dense d_model -> d_model, exact GELU, LayerNorm."""

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        return self.ln(F.gelu(self.dense(x)))


class BERT(nn.Module):
    """BERT masked LM: `forward(input_ids, token_type_ids=None, attention_mask=None) -> logits (B, T, vocab_size)`
    (padding rows of the vocabulary are never projected: see GPT)."""

    # a pipeline stage without them: see GPT
    PIPELINE_FIRST, PIPELINE_LAST = ("tok_emb", "pos_emb", "type_emb", "ln_emb"), ("head", "lm_head")

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.ln_emb = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        # keyed by the global layer index: a process holding only some blocks keeps their names
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.head = MLMHead(cfg)
        self.lm_head = VocabHead(cfg, bias=True)
        self.loss_chunk_rows = 0  # > 0: the MLM head and loss in checkpointed chunks of this many tokens
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Make the decoder share the word embedding's Parameter (call again after replacing either); a pipeline
        stage holding one of them only keeps its own copy."""
        if self.lm_head is not None and self.tok_emb is not None:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT init: N(0, 0.02) weights, zero biases, unit LayerNorms.

        Public so a model built on the meta device can be initialised after `to_empty`, which unties the decoder
        from the embedding (meta -> real device makes new Parameters); this re-ties it first.
        """
        self.tie_weights()
        init_weights_(self, self.lm_head)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> MLM logits (B, T, vocab_size); with labels (B, T), -100 where no token is masked, the
        summed loss over the masked tokens (a scalar) instead.

        token_type_ids: (B, T) segment ids, default all 0. attention_mask: (B, T), 1 for real tokens and 0 for padding;
        padded keys are hidden from every query (padded positions still get logits, which the loss should ignore).
        """
        x = input_ids  # a pipeline stage after the first: the previous stage's hidden state
        if self.tok_emb is not None:
            t = input_ids.shape[-1]
            check_seq_len(t, self.config.max_seq_len)
            positions = torch.arange(t, device=input_ids.device)
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(token_type_ids)
            x = self.emb_dropout(self.ln_emb(x))
        attn_bias = None if attention_mask is None else attention_mask[:, None, None, :].to(torch.bool)
        for block in self.blocks.values():
            x = block(x, attn_bias)
        return x if self.lm_head is None else self.output(x, labels)

    def output(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """MLM transform and tied decoder, then the loss when `labels` are given (one unit to compile, as GPT's)."""
        if labels is None:
            return self.lm_head(self.head(x))
        return head_loss_sum(lambda h: self.lm_head(self.head(h)), x, labels, self.loss_chunk_rows)
