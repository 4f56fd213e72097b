"""GPT-2: pre-LayerNorm decoder, learned positions, GELU MLP, LM head tied to the token embedding."""

from trainer.models.family import Family
from trainer.models.gpt.config import PRESETS, GPTConfig
from trainer.models.gpt.model import GPT

FAMILY = Family(
    arch="gpt",
    title="GPT",
    config=GPTConfig,
    model=GPT,
    presets=PRESETS,
    objective="causal",
    tensor_parallel="trainer.models.gpt.tensor_parallel",
    hf="trainer.models.gpt.hf",
)
