"""Megatron-style tensor parallelism with DTensor on the `tp` mesh axis, plus sequence parallelism.

Within a block (Y = XW with W = [W_1 ... W_p] split over the p tp ranks):
- attention: wq/wk/wv column-parallel (each rank holds n_head/p heads), wo row-parallel;
- MLP: fc_in column-parallel (d_ff/p hidden units), fc_out row-parallel;
- the row-parallel outputs are reduce-scattered over the sequence (sequence parallel): between blocks every rank holds
  T/p positions of the residual stream, so LayerNorms and residual dropout run on 1/p of the tokens; attention and MLP
  inputs are all-gathered over the sequence first.
Outside the blocks: token (and position / token-type) embeddings are vocab-/row-parallel and reduce-scatter into the
sequence-sharded stream; the tied LM head is column-parallel over the vocabulary and its logits stay sharded
(DTensor Shard(-1)), so `loss_parallel` computes the cross-entropy without ever gathering the full logits.

The plans live here, not in the model files; they rely only on the models' module names.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from trainer.errors import UserError


def check_tp_degree(tp: int, n_head: int, d_ff: int, vocab_size: int, seq_len: int) -> None:
    """Refuses degrees that do not split heads, MLP width, vocabulary and sequence evenly, before any work."""
    for what, value, fix in (
        ("model.n_head", n_head, "model.n_head"),
        ("model.d_ff", d_ff, "model.d_ff"),
        ("model.vocab_size", vocab_size, "model.vocab_size (pad it up to a multiple)"),
        ("data.seq_len", seq_len, "data.seq_len (sequence parallelism splits it)"),
    ):
        if value % tp:
            raise UserError(
                f"parallel.tp={tp} does not divide {what}={value}: choose a tp that divides it or change {fix}"
            )


def _block_plan(arch: str) -> dict:
    gather_seq = PrepareModuleInput(
        input_layouts=(Shard(1), None) if arch == "bert" else (Shard(1),),
        desired_input_layouts=(Replicate(), None) if arch == "bert" else (Replicate(),),
    )
    norm = SequenceParallel(use_local_output=True)
    norms = ("ln_attn", "ln_mlp") if arch == "bert" else ("ln_1", "ln_2")
    return {
        **{name: norm for name in norms},
        "attn": gather_seq,
        "attn.wq": ColwiseParallel(),
        "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(),
        "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.fc_in": ColwiseParallel(),
        "mlp.fc_out": RowwiseParallel(output_layouts=Shard(1)),
    }


def _top_plan(arch: str) -> dict:
    plan = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "pos_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0)),  # positions: (T,) -> (T, d)
    }
    if arch == "gpt":
        plan["ln_f"] = SequenceParallel(use_local_output=True)
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    else:
        plan["type_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        plan["ln_emb"] = SequenceParallel(use_local_output=True)
        # The small MLM transform runs replicated on the gathered sequence; the decoder is vocab-parallel.
        plan["head"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        plan["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shards `model` (GPT or BERT of this package) in place over `tp_mesh`; re-ties the LM head to the (now
    vocab-sharded) token embedding, which has the same Shard(0)-over-vocabulary layout."""
    arch = model.config.arch
    for block in model.blocks:
        parallelize_module(block, tp_mesh, _block_plan(arch))
    parallelize_module(model, tp_mesh, _top_plan(arch))
    model.tie_weights()


def loss_context(tp: int):
    """Cross-entropy over vocab-sharded logits (forward and backward) needs `loss_parallel` when tp > 1."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the whole value of `t` (gathers a sharded DTensor; for losses and evaluation)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
