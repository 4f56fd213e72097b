"""GPT-2's tensor-parallel plan (see trainer/models/tp_plans.py for the layout)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import parallelize_module

from trainer.models.tp_plans import (
    block_plan,
    mask_head_shards,
    positions_embedding,
    present,
    sequence_norm,
    vocab_embedding,
    vocab_head,
)

BLOCK = block_plan(
    norms=("ln_1", "ln_2"), columns=("attn.wq", "attn.wk", "attn.wv", "mlp.fc_in"), rows=("attn.wo", "mlp.fc_out")
)


def apply(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shards `model` in place; re-ties the LM head to the (now vocab-sharded) token embedding: both are Shard(0)
    over the vocabulary."""
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, BLOCK)
    top = {
        "tok_emb": vocab_embedding(),
        "pos_emb": positions_embedding(),
        "ln_f": sequence_norm(),
        "lm_head": vocab_head(Shard(1)),
    }
    parallelize_module(model, tp_mesh, present(model, top))
    mask_head_shards(model)
    model.tie_weights()
