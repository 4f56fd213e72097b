"""BERT's tensor-parallel plan (see trainer/models/tp_plans.py for the layout). The small MLM transform runs
replicated on the gathered sequence; the decoder is vocab-parallel."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

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
    norms=("ln_attn", "ln_mlp"),
    columns=("attn.wq", "attn.wk", "attn.wv", "mlp.fc_in"),
    rows=("attn.wo", "mlp.fc_out"),
    attn_extra_inputs=1,  # the key mask
)


def apply(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shards `model` in place and re-ties the decoder to the vocab-sharded word embedding."""
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, BLOCK)
    top = {
        "tok_emb": vocab_embedding(),
        "pos_emb": positions_embedding(),
        "type_emb": vocab_embedding(),
        "ln_emb": sequence_norm(),
        "head": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "lm_head": vocab_head(Replicate()),
    }
    parallelize_module(model, tp_mesh, present(model, top))
    mask_head_shards(model)
    model.tie_weights()
