"""GPT-2's dimensions and the published sizes (GPT-2 paper / Hugging Face gpt2*), plus tiny ones for CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainer.errors import UserError
from trainer.models.family import ModelConfig


@dataclass
class GPTConfig(ModelConfig):
    arch = "gpt"
    LEGACY: ClassVar[dict] = {
        "type_vocab_size": 2
    }  # saved by every GPT checkpoint before families had their own configs

    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; must divide d_model."""
    d_model: int
    """Hidden size (width of the residual stream)."""
    vocab_size: int
    """Tokens of the vocabulary (ids 0..vocab_size-1); the embedding and head have padded_vocab_size rows."""
    max_seq_len: int
    """Learned position embeddings; longer inputs are an error."""
    dropout: float = 0.0
    """One dropout rate for embeddings, attention probabilities and residual branches (0 for pretraining at scale)."""
    d_ff: int | None = None
    """MLP inner width; None means 4 * d_model."""
    layer_norm_eps: float = 1e-5
    vocab_multiple: int = 1
    """The embedding and LM head rows are vocab_size rounded up to a multiple of this (`padded_vocab_size`); 1: none.
    A run defaults it to 128 (times what tensor parallelism needs); checkpoints saved without it had none."""

    def fill_defaults(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    def check(self) -> None:
        check_heads(self.d_model, self.n_head)
        check_dropout_eps(self.dropout, self.layer_norm_eps, "layer_norm_eps")


def check_heads(d_model: int, n_head: int) -> None:
    if d_model % n_head != 0:
        divisors = [d for d in range(1, d_model + 1) if d_model % d == 0]
        near = min(divisors, key=lambda d: (abs(d - n_head), d))
        raise UserError(
            f"model.d_model={d_model} is not divisible by model.n_head={n_head}; "
            f"pick n_head among the divisors of d_model (e.g. {near})"
        )


def check_dropout_eps(dropout: float, eps: float, eps_name: str) -> None:
    if not 0.0 <= float(dropout) < 1.0:
        raise UserError(f"model.dropout={dropout!r} is invalid; set it in [0, 1)")
    if not float(eps) > 0.0:
        raise UserError(f"model.{eps_name}={eps!r} is invalid; set it to a small positive float")


def _gpt(n_layer: int, n_head: int, d_model: int, vocab_size: int = 50257, max_seq_len: int = 1024) -> GPTConfig:
    return GPTConfig(n_layer, n_head, d_model, vocab_size, max_seq_len)


PRESETS = {
    "gpt2-small": _gpt(12, 12, 768),  # 124M
    "gpt2-medium": _gpt(24, 16, 1024),  # 355M
    "gpt2-large": _gpt(36, 20, 1280),  # 774M
    "gpt2-xl": _gpt(48, 25, 1600),  # 1.5B
    "gpt-tiny": _gpt(2, 2, 64, vocab_size=2048, max_seq_len=128),
    "gpt-mini": _gpt(4, 4, 128, vocab_size=2048, max_seq_len=256),
}
