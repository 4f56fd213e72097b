"""Model families and construction: `build_model(arch, preset, **dims)`, configs and presets, parameter counting.

Each family is a folder (gpt/, bert/, llama/) with its config, model, presets, tensor-parallel plan and Hugging Face
adapter; `registry.py` maps `model.arch` to it. Models are plain torch.nn (no torch.distributed); parallelism is
applied to a built model from outside. Build on the meta device (`with torch.device("meta"): build_model(...)`) to
size a large model without memory.
"""

from __future__ import annotations

from torch import nn

from trainer.models.family import OBJECTIVES, Family, ModelConfig
from trainer.models.registry import ARCHS, all_presets, config_from_dict, family, resolve_model_config

__all__ = [
    "ARCHS",
    "OBJECTIVES",
    "Family",
    "ModelConfig",
    "all_presets",
    "build_model",
    "config_from_dict",
    "count_params",
    "family",
    "model_from_config",
    "resolve_model_config",
]


def model_from_config(cfg: ModelConfig) -> nn.Module:
    """Construct the model a resolved config describes (randomly initialised, on the current default device)."""
    return family(cfg.arch).model(cfg)


def build_model(arch: str, preset: str | None = None, **dims: object) -> nn.Module:
    """Resolve `preset` + `dims` overrides into the family's config and construct the model."""
    return model_from_config(resolve_model_config(arch, preset, **dims))


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters, each shared tensor (tied embedding / LM head) counted once.

    exclude_embeddings drops the token, position and token-type embedding tables: the count used for FLOPs
    estimates (6 * N per token), since a table lookup costs no matmul. A tied LM head goes with the token table.
    """
    embedding_ids: set[int] = set()
    if exclude_embeddings:
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # parameters() yields a shared Parameter once; numel() of a sharded DTensor is its global size.
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
