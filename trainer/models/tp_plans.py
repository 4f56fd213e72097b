"""Pieces of Megatron-style tensor-parallel plans (DTensor, on the `tp` mesh axis) that the families' plans share.

Within a block (Y = XW with W = [W_1 ... W_p] split over the p tp ranks): the attention projections q/k/v and the
MLP's input projection(s) are column-parallel (each rank holds n_head/p heads, d_ff/p hidden units), the output
projections row-parallel and reduce-scattered over the sequence (sequence parallelism): between blocks every rank
holds T/p positions of the residual stream, so norms and residual dropout run on 1/p of the tokens, and attention and
MLP inputs are all-gathered over the sequence first. Outside the blocks the token embedding is vocab-parallel and
reduce-scatters into the sequence-sharded stream; the LM head is column-parallel over the vocabulary and its logits
stay sharded (Shard(-1)), so `loss_parallel` computes the cross-entropy without gathering them; the head projects
every row of a padded vocabulary (the sharded weight cannot be cut) and each rank sets -inf in the padding columns it
holds, so the sharded softmax never counts them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)


def block_plan(
    norms: tuple[str, ...], columns: tuple[str, ...], rows: tuple[str, ...], attn_extra_inputs: int = 0
) -> dict:
    """The plan of one block: `norms` sequence-parallel, `columns` column- and `rows` row-parallel (names relative to
    the block), the `attn` and `mlp` submodules' first input gathered over the sequence (`attn_extra_inputs` more
    inputs passed through untouched, e.g. BERT's key mask or Llama's rotary tables)."""
    extra = (None,) * attn_extra_inputs
    return {
        **{name: SequenceParallel(use_local_output=True) for name in norms},
        "attn": PrepareModuleInput(input_layouts=(Shard(1), *extra), desired_input_layouts=(Replicate(), *extra)),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        **{name: ColwiseParallel() for name in columns},
        **{name: RowwiseParallel(output_layouts=Shard(1)) for name in rows},
    }


def vocab_embedding() -> RowwiseParallel:
    """A token (or token-type) embedding sharded over its rows, its output reduce-scattered over the sequence."""
    return RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))


def positions_embedding() -> RowwiseParallel:
    """Learned positions looked up with a (T,) index: the output (T, d) is scattered over T."""
    return RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))


def sequence_norm() -> SequenceParallel:
    return SequenceParallel(use_local_output=True)


def vocab_head(input_layout) -> ColwiseParallel:
    """The LM head, column-parallel over the vocabulary; its logits stay a vocab-sharded DTensor."""
    return ColwiseParallel(input_layouts=input_layout, output_layouts=Shard(-1), use_local_output=False)


def mask_vocab_shards(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over the padded vocabulary (trainer.models.layers.VocabHead) with -inf in the padding columns (ids >=
    vocab_size); sharded over the vocabulary (a Shard(-1) DTensor), each rank fills those of its own shard, without
    gathering anything."""
    if not isinstance(logits, DTensor):
        cols = torch.arange(logits.shape[-1], device=logits.device)
        return logits.masked_fill(cols >= vocab_size, float("-inf"))
    shape, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    local = logits.to_local()
    cols = torch.arange(offset[-1], offset[-1] + shape[-1], device=local.device)
    local = local.masked_fill(cols >= vocab_size, float("-inf"))
    return DTensor.from_local(
        local, logits.device_mesh, logits.placements, run_check=False, shape=logits.shape, stride=logits.stride()
    )


def mask_head_shards(model: nn.Module) -> None:
    """The LM head of a vocab-parallel model (if this model, or pipeline stage, holds it) masks its padding columns
    shard by shard (its logits are a vocab-sharded DTensor)."""
    if getattr(model, "lm_head", None) is not None:
        model.lm_head.mask = mask_vocab_shards


def present(model, plan: dict) -> dict:
    """The entries of a top-level plan whose module this model holds (a pipeline stage lacks the embeddings or the
    head of the others)."""
    return {name: style for name, style in plan.items() if getattr(model, name.split(".")[0]) is not None}
