"""BERT's dimensions and the published sizes (BERT paper / Hugging Face bert-*-uncased), plus tiny ones for CPU."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.models.family import ModelConfig
from trainer.models.gpt.config import check_dropout_eps, check_heads


@dataclass
class BERTConfig(ModelConfig):
    arch = "bert"
    POSITIVE = (*ModelConfig.POSITIVE, "type_vocab_size")

    n_layer: int
    """Number of encoder layers."""
    n_head: int
    """Attention heads per layer; must divide d_model."""
    d_model: int
    """Hidden size."""
    vocab_size: int
    """Tokens of the vocabulary (ids 0..vocab_size-1); the embedding and head have padded_vocab_size rows."""
    max_seq_len: int
    """Learned position embeddings; longer inputs are an error."""
    dropout: float = 0.0
    """One dropout rate for embeddings, attention probabilities and residual branches."""
    d_ff: int | None = None
    """MLP inner width; None means 4 * d_model."""
    type_vocab_size: int = 2
    """Number of segment (token type) ids."""
    layer_norm_eps: float = 1e-12
    vocab_multiple: int = 1
    """The embedding and LM head rows are vocab_size rounded up to a multiple of this (`padded_vocab_size`); 1: none.
    A run defaults it to 128 (times what tensor parallelism needs); checkpoints saved without it had none."""

    def saved_bytes(self, b: int, s: int, tp: int, e: int) -> dict[str, int]:
        """As GPT-2's block (see ModelConfig); the embeddings add the segment ids and their LayerNorm, the MLM head
        its dense layer, GELU and LayerNorm before the decoder."""
        out = super().saved_bytes(b, s, tp, e)
        h, bs = self.d_model, b * s
        out["first"] += bs * 8 + bs * h * e + 2 * bs * 4
        extra = 2 * bs * h * e  # the dense output and the GELU output
        out["last"] += extra
        out["last_chunked"] += extra
        return out

    def fill_defaults(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    def check(self) -> None:
        check_heads(self.d_model, self.n_head)
        check_dropout_eps(self.dropout, self.layer_norm_eps, "layer_norm_eps")


def _bert(n_layer: int, n_head: int, d_model: int, vocab_size: int = 30522, max_seq_len: int = 512) -> BERTConfig:
    return BERTConfig(n_layer, n_head, d_model, vocab_size, max_seq_len)


PRESETS = {
    "bert-base": _bert(12, 12, 768),  # 110M
    "bert-large": _bert(24, 16, 1024),  # 335M
    "bert-tiny": _bert(2, 2, 64, vocab_size=2048, max_seq_len=128),
    "bert-mini": _bert(4, 4, 256, vocab_size=2048, max_seq_len=256),
}
