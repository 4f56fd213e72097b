"""`load_model`: the trained model from any checkpoint (any engine, layout and world size), consolidated into one
whole CPU model, for `trainer export` and inference."""

from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.checkpoint.directory import resolve_checkpoint_dir
from trainer.checkpoint.state import read_state
from trainer.engines.base import DCP_DIR


def load_model(checkpoint_dir: str | Path) -> nn.Module:
    """The trained model from a checkpoint, consolidated on CPU, in eval mode."""
    from trainer.engines.deepspeed import PAYLOAD_DIR as DS_PAYLOAD_DIR
    from trainer.engines.deepspeed import consolidate as consolidate_deepspeed
    from trainer.models import config_from_dict, model_from_config

    path = resolve_checkpoint_dir(checkpoint_dir)  # verified: a damaged checkpoint is one line, not a traceback
    model = model_from_config(config_from_dict(read_state(path)["model_config"]))
    if (path / DS_PAYLOAD_DIR).is_dir():  # DeepSpeed's zero_to_fp32 gathers any ZeRO stage's partitions
        model.load_state_dict(consolidate_deepspeed(path))
    else:  # DCP reads the shards of any layout (ddp, fsdp, tp, any world size) into this one whole CPU model
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=True)
        model.load_state_dict(state["model"])
    model.tie_weights()
    return model.eval()
