"""The Llama family's tensor-parallel plan (see trainer/models/tp_plans.py for the layout). Query heads and key/value
heads are split alike, so tp must divide n_kv_heads: each rank keeps whole GQA groups. QK-norm weights are replicated
and see the rank's heads as a shard of the heads dimension; their gradients are summed over tp before the step."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from trainer.models.tp_plans import block_plan, sequence_norm, vocab_embedding, vocab_head


def apply(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    plan = block_plan(
        norms=("attn_norm", "mlp_norm"),
        columns=("attn.wq", "attn.wk", "attn.wv", "mlp.gate", "mlp.up"),
        rows=("attn.wo", "mlp.down"),
        attn_extra_inputs=2,  # cos, sin of the whole sequence
    )
    if model.config.qk_norm:  # (B, T, local heads, head_dim): sharded over the heads dimension
        plan.update(
            {f"attn.{n}": SequenceParallel(sequence_dim=2, use_local_output=True) for n in ("q_norm", "k_norm")}
        )
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, plan)
    top = {"tok_emb": vocab_embedding(), "norm": sequence_norm(), "lm_head": vocab_head(Shard(1))}
    parallelize_module(model, tp_mesh, top)
    model.tie_weights()
