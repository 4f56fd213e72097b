"""Model construction: `build_model(arch, preset, **dims)`, configs and presets, and parameter counting.

Models are plain torch.nn (no torch.distributed); parallelism is applied to a built model from outside.
Build on the meta device (`with torch.device("meta"): build_model(...)`) to size a large model without memory.
"""

from __future__ import annotations

from torch import nn

from trainer.models.bert import BERT
from trainer.models.gpt import GPT
from trainer.models.presets import PRESETS, ModelConfig, resolve_model_config

__all__ = [
    "BERT",
    "GPT",
    "PRESETS",
    "ModelConfig",
    "build_model",
    "count_params",
    "model_from_config",
    "resolve_model_config",
]


def model_from_config(cfg: ModelConfig) -> nn.Module:
    """Construct the model a resolved config describes (randomly initialised, on the current default device)."""
    return GPT(cfg) if cfg.arch == "gpt" else BERT(cfg)


def build_model(arch: str, preset: str | None = None, **dims: object) -> nn.Module:
    """Resolve `preset` + `dims` overrides into a `ModelConfig` and construct the model."""
    return model_from_config(resolve_model_config(arch, preset, **dims))


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters, each shared tensor (tied embedding / LM head) counted once.

    exclude_embeddings drops the token, position and token-type embedding tables: the count used for FLOPs
    estimates (6 * N per token), since a table lookup costs no matmul. The tied LM head goes with the token table.
    """
    embedding_ids: set[int] = set()
    if exclude_embeddings:
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # parameters() yields a shared Parameter once; numel() of a sharded DTensor is its global size.
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
