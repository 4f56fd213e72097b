"""Model shapes: the `ModelConfig` dataclass, the named presets, and how a preset plus overrides becomes a config."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from trainer.errors import UserError

ARCHS = ("gpt", "bert")


@dataclass
class ModelConfig:
    """Every number that fixes a model's shape; nothing about parallelism or training."""

    arch: str
    """Model family: "gpt" (causal decoder, GPT-2 layout) or "bert" (bidirectional encoder with an MLM head)."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; must divide d_model."""
    d_model: int
    """Hidden size (width of the residual stream)."""
    vocab_size: int
    """Rows of the token embedding (and columns of the tied LM head)."""
    max_seq_len: int
    """Learned position embeddings; longer inputs are an error."""
    dropout: float = 0.0
    """One dropout rate for embeddings, attention probabilities and residual branches (0 for pretraining at scale)."""
    d_ff: int | None = None
    """MLP inner width; None means 4 * d_model, as in GPT-2 and BERT."""
    type_vocab_size: int = 2
    """BERT only: number of segment (token type) ids."""
    layer_norm_eps: float | None = None
    """None means the published value: 1e-5 for GPT-2, 1e-12 for BERT."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"model.arch={self.arch!r} is unknown; use one of {', '.join(ARCHS)}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.layer_norm_eps is None:
            self.layer_norm_eps = 1e-5 if self.arch == "gpt" else 1e-12
        for name in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len", "d_ff", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}={value!r} is invalid; set it to a positive integer")
        if self.d_model % self.n_head != 0:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                f"pick n_head among the divisors of d_model (e.g. {_nearest_divisor(self.d_model, self.n_head)})"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"model.dropout={self.dropout!r} is invalid; set it in [0, 1)")
        if not float(self.layer_norm_eps) > 0.0:
            raise UserError(
                f"model.layer_norm_eps={self.layer_norm_eps!r} is invalid; set it to a small positive float"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        """Plain dict (for checkpoints and logs); `ModelConfig(**d)` rebuilds it."""
        return dataclasses.asdict(self)


def _nearest_divisor(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def _gpt(n_layer: int, n_head: int, d_model: int, vocab_size: int = 50257, max_seq_len: int = 1024) -> ModelConfig:
    return ModelConfig("gpt", n_layer, n_head, d_model, vocab_size, max_seq_len)


def _bert(n_layer: int, n_head: int, d_model: int, vocab_size: int = 30522, max_seq_len: int = 512) -> ModelConfig:
    return ModelConfig("bert", n_layer, n_head, d_model, vocab_size, max_seq_len, type_vocab_size=2)


# Published sizes (GPT-2 paper / HF gpt2*, BERT paper / HF bert-*-uncased), plus tiny ones that train in seconds on CPU.
PRESETS: dict[str, ModelConfig] = {
    "gpt2-small": _gpt(12, 12, 768),  # 124M
    "gpt2-medium": _gpt(24, 16, 1024),  # 355M
    "gpt2-large": _gpt(36, 20, 1280),  # 774M
    "gpt2-xl": _gpt(48, 25, 1600),  # 1.5B
    "gpt-tiny": _gpt(2, 2, 64, vocab_size=2048, max_seq_len=128),
    "gpt-mini": _gpt(4, 4, 128, vocab_size=2048, max_seq_len=256),
    "bert-base": _bert(12, 12, 768),  # 110M
    "bert-large": _bert(24, 16, 1024),  # 335M
    "bert-tiny": _bert(2, 2, 64, vocab_size=2048, max_seq_len=128),
    "bert-mini": _bert(4, 4, 256, vocab_size=2048, max_seq_len=256),
}


def resolve_model_config(arch: str, preset: str | None = None, **dims: object) -> ModelConfig:
    """Start from `preset` (or nothing) and apply `dims` overrides; every error names the fix.

    Overriding `d_model` of a preset re-derives `d_ff` (4 * d_model) unless `d_ff` is given too.
    """
    if arch not in ARCHS:
        raise UserError(f"model.arch={arch!r} is unknown; use one of {', '.join(ARCHS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"arch"}
    unknown = sorted(set(dims) - known)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"did you mean model.{close[0]}?" if close else f"valid keys: {', '.join(sorted(known))}"
        raise UserError(f"model.{name} is not a model setting; {hint}")
    values: dict[str, object] = {}
    if preset is not None:
        if preset not in PRESETS:
            same_arch = [name for name, cfg in PRESETS.items() if cfg.arch == arch]
            close = difflib.get_close_matches(preset, same_arch, n=1, cutoff=0.0)
            raise UserError(
                f"model.preset={preset!r} is unknown; did you mean {close[0]!r}? (presets: {', '.join(same_arch)})"
            )
        base = PRESETS[preset]
        if base.arch != arch:
            others = [name for name, cfg in PRESETS.items() if cfg.arch == arch]
            raise UserError(
                f"model.preset={preset!r} is a {base.arch} preset but model.arch={arch!r}; "
                f"set model.arch={base.arch} or pick one of {', '.join(others)}"
            )
        values = base.to_dict()
        values.pop("arch")
        if "d_model" in dims and "d_ff" not in dims:
            values["d_ff"] = None
    values.update({k: v for k, v in dims.items() if v is not None})
    missing = [f for f in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len") if f not in values]
    if missing:
        raise UserError(f"model.{missing[0]} is not set; give a model.preset or set {', '.join(missing)}")
    return ModelConfig(arch=arch, **values)
