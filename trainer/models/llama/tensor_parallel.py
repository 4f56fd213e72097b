"""The Llama family's tensor-parallel plan (see trainer/models/tp_plans.py for the layout). Query heads and key/value
heads are split alike, so tp must divide n_kv_heads: each rank keeps whole GQA groups. QK-norm weights are replicated
and see the rank's heads as a shard of the heads dimension; their gradients are summed over tp before the step."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from trainer.models.tp_plans import block_plan, mask_head_shards, present, sequence_norm, vocab_embedding, vocab_head


def apply(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    plan = block_plan(
        norms=("attn_norm", "mlp_norm"),
        columns=("attn.wq", "attn.wk", "attn.wv", "mlp.gate", "mlp.up"),
        rows=("attn.wo", "mlp.down"),
    )
    if model.config.qk_norm:  # (B, T, local heads, head_dim): sharded over the heads dimension
        plan.update(
            {f"attn.{n}": SequenceParallel(sequence_dim=2, use_local_output=True) for n in ("q_norm", "k_norm")}
        )
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, plan)
    top = {"tok_emb": vocab_embedding(), "norm": sequence_norm(), "lm_head": vocab_head(Shard(1))}
    parallelize_module(model, tp_mesh, present(model, top))
    # The embedding's output (the local shard DTensor.to_local returns) goes straight into block 0; when that block is
    # compiled, its backward hands the reduce-scatter a plain gradient ('Tensor' object has no attribute
    # '_local_tensor'). A copy breaks the alias (GPT's sum with the position embedding does the same).
    if model.tok_emb is not None:
        model.tok_emb.register_forward_hook(lambda module, args, out: out.clone())
    mask_head_shards(model)
    model.tie_weights()
