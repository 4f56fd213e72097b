"""Llama-style decoders' dimensions (Llama 2/3, SmolLM2, Qwen3 with QK-norm) and published sizes, plus tiny ones."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import UserError
from trainer.models.family import ModelConfig
from trainer.models.gpt.config import check_dropout_eps

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig(ModelConfig):
    arch = "llama"
    POSITIVE = (*ModelConfig.POSITIVE, "n_kv_heads", "head_dim")
    FROM_D_MODEL = ("d_ff", "head_dim")

    n_layer: int
    """Number of decoder blocks."""
    n_head: int
    """Query heads per block."""
    d_model: int
    """Hidden size (width of the residual stream)."""
    vocab_size: int
    """Tokens of the vocabulary (ids 0..vocab_size-1); the embedding and head have padded_vocab_size rows."""
    max_seq_len: int
    """Longest sequence (rotary positions need no table: this only bounds the input)."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide n_head. None: n_head (multi-head attention)."""
    head_dim: int | None = None
    """Width of one head; None: d_model / n_head (Qwen3 sets it apart from d_model)."""
    d_ff: int | None = None
    """SwiGLU inner width; None: Llama's rule, 2/3 of 4 * d_model rounded up to a multiple of 256."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: dict | None = None
    """Llama 3's frequency scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Whether the LM head shares the token embedding's weight (the small published models do)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before the rotation (Qwen3)."""
    dropout: float = 0.0
    """Dropout of attention probabilities and residual branches (0 in every published recipe)."""
    vocab_multiple: int = 1
    """The embedding and LM head rows are vocab_size rounded up to a multiple of this (`padded_vocab_size`); 1: none.
    A run defaults it to 128 (times what tensor parallelism needs); checkpoints saved without it had none."""

    def saved_bytes(self, b: int, s: int, tp: int, e: int) -> dict[str, int]:
        """Llama's block (see ModelConfig for the parts): two RMSNorms (input, fp32 rstd, normalised), the attention
        and MLP inputs gathered over the sequence, q, k and v (grouped key/value heads), the rotary tables, the
        attention output and log-sum-exp, SwiGLU's gate, up, SiLU and product; with qk_norm, its norms' inputs."""
        h, f, bs, a, kv, hd = self.d_model, self.d_ff, b * s, self.n_head, self.n_kv_heads, self.head_dim
        q_dim, kv_dim = a * hd, kv * hd
        block = (
            4 * bs * h // tp + 2 * bs * h + 2 * bs * q_dim // tp + 2 * bs * kv_dim // tp + 4 * bs * f // tp
        ) * e + (2 * bs // tp + b * a // tp * s) * 4
        block += 2 * s * hd * e  # cos, sin
        if self.qk_norm:
            block += 2 * bs * (q_dim + kv_dim) // tp * e + bs * (a + kv) // tp * 4
        head = (2 * bs * h // tp + bs * h) * e + bs // tp * 4
        return {
            "block": block,
            "block_input": bs * h // tp * e,
            "first": bs * 8,
            "last": head + bs * -(-self.padded_vocab_size // tp) * 4 + bs * 8,
            "last_chunked": head + bs * 8,
        }

    def fill_defaults(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.head_dim is None and isinstance(self.n_head, int) and self.n_head > 0:
            if self.d_model % self.n_head:
                raise UserError(
                    f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: pick n_head among "
                    f"its divisors or set model.head_dim"
                )
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            self.d_ff = 256 * -(-(8 * self.d_model // 3) // 256)

    def check(self) -> None:
        if self.n_head % self.n_kv_heads:
            raise UserError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_head={self.n_head}: each key/value head "
                f"serves a group of query heads; pick a divisor of n_head"
            )
        check_dropout_eps(self.dropout, self.norm_eps, "norm_eps")
        if not float(self.rope_theta) > 0:
            raise UserError(f"model.rope_theta={self.rope_theta!r} is invalid; set a positive base (e.g. 10000)")
        if self.rope_scaling is not None:
            missing = [k for k in ROPE_SCALING_KEYS if k not in self.rope_scaling]
            if missing or set(self.rope_scaling) - set(ROPE_SCALING_KEYS):
                raise UserError(
                    f"model.rope_scaling={self.rope_scaling!r} must hold exactly {', '.join(ROPE_SCALING_KEYS)} "
                    f"(Llama 3's scaling), or be null"
                )
        for name in ("tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model.{name}={getattr(self, name)!r} is invalid; set true or false")

    @property
    def tied_head(self) -> bool:
        return self.tie_embeddings

    def tp_divisors(self) -> dict[str, int]:
        return {**super().tp_divisors(), "model.n_kv_heads": self.n_kv_heads}


LLAMA3_SCALING = {
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Published models (their Hugging Face config.json), with their vocabularies; parameter counts in docs/models.md.
PRESETS = {
    "smollm2-135m": LlamaConfig(
        30, 9, 576, 49152, 8192, n_kv_heads=3, d_ff=1536, rope_theta=100000.0, tie_embeddings=True
    ),
    "smollm2-360m": LlamaConfig(
        32, 15, 960, 49152, 8192, n_kv_heads=5, d_ff=2560, rope_theta=100000.0, tie_embeddings=True
    ),
    "llama3.2-1b": LlamaConfig(
        16,
        32,
        2048,
        128256,
        131072,
        n_kv_heads=8,
        d_ff=8192,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        tie_embeddings=True,
    ),
    "qwen3-0.6b": LlamaConfig(
        28,
        16,
        1024,
        151936,
        40960,
        n_kv_heads=8,
        head_dim=128,
        d_ff=3072,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        tie_embeddings=True,
        qk_norm=True,
    ),
    "llama-tiny": LlamaConfig(2, 4, 64, 2048, 128, n_kv_heads=2, d_ff=192),
    "llama-mini": LlamaConfig(4, 4, 128, 2048, 256, n_kv_heads=2, d_ff=384),
}
