"""Llama-style decoders: RMSNorm, RoPE (Llama 3 scaling optional), grouped-query attention, SwiGLU, no biases; tied
or untied head; optional QK-norm (Qwen3)."""

from trainer.models.family import Family
from trainer.models.llama.config import PRESETS, LlamaConfig
from trainer.models.llama.model import Llama

FAMILY = Family(
    arch="llama",
    title="Llama",
    config=LlamaConfig,
    model=Llama,
    presets=PRESETS,
    objective="causal",
    tensor_parallel="trainer.models.llama.tensor_parallel",
    hf="trainer.models.llama.hf",
)
