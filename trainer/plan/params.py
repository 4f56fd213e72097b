"""The model's parameters as the memory formula counts them: each with its shape, its tensor-parallel split and where
it lives (a block, the embeddings, the head), read from the real model built on the meta device; and the sums over
what one pipeline rank holds (its numel at a tp degree, its FSDP2 shard, its DeepSpeed partition).

A search weighs thousands of layouts that share a handful of pipeline splits and degrees, so each of these is computed
once per model, split, rank and degree and then looked up: a 405B model's 1,100 parameter tensors are not walked
again for every micro-batch size, checkpointing mode and engine."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainer.models import ModelConfig, model_from_config
from trainer.parallel.pipeline import PipelinePlan, head_cost_in_blocks

COLUMN = ("wq", "wk", "wv", "fc_in", "gate", "up")  # column-parallel: dim 0 split over tp (bias too)
ROW = ("wo", "fc_out", "down")  # row-parallel: dim 1 split (bias whole)

_KEYS: dict[int, tuple[ModelConfig, str]] = {}


def model_key(model_cfg: ModelConfig) -> str:
    """A key naming the model's shape, for the caches below (computed once per config object: configs are
    replaced, never changed in place)."""
    hit = _KEYS.get(id(model_cfg))
    if hit is None or hit[0] is not model_cfg:
        hit = (model_cfg, repr(sorted(model_cfg.to_dict().items())))
        _KEYS[id(model_cfg)] = hit
    return hit[1]


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # the dim tensor parallelism splits, or None (replicated)
    layer: int | None  # its block, or None outside the blocks
    part: str  # "block", "first" (embeddings), "last" (final norm and head) or "tied" (first, copied on the last)
    decay: bool = True  # in AdamW's weight-decay group (the order DeepSpeed flattens parameters in)

    def local_shape(self, tp: int) -> tuple[int, ...]:
        if self.tp_dim is None or tp == 1:
            return self.shape
        s = list(self.shape)
        s[self.tp_dim] = math.ceil(s[self.tp_dim] / tp)
        return tuple(s)


_PARAMS: dict[str, tuple] = {}


def model_params(model_cfg: ModelConfig) -> tuple[Param, ...]:
    """Every distinct parameter of the model with its tensor-parallel split and where it lives."""
    key = model_key(model_cfg)
    if key not in _PARAMS:
        _PARAMS[key] = _model_params(model_cfg)
    return _PARAMS[key]


_META: dict[str, torch.nn.Module] = {}


def meta_model(model_cfg: ModelConfig) -> torch.nn.Module:
    """The model built on the meta device (shapes, no memory), once per shape: the parameter table, the head's cost
    and the FLOP count all read it, and building a large one takes seconds."""
    key = model_key(model_cfg)
    if key not in _META:
        with torch.device("meta"):
            _META[key] = model_from_config(model_cfg)
    return _META[key]


def _model_params(model_cfg: ModelConfig) -> tuple[Param, ...]:
    model = meta_model(model_cfg)
    first, last = model.PIPELINE_FIRST, model.PIPELINE_LAST
    tied = {id(model.lm_head.weight)} if model_cfg.tied_head else set()
    out = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "blocks" else None
        owner = parts[-2] if len(parts) >= 2 else ""
        module = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
        if layer is not None:
            tp_dim = 0 if owner in COLUMN else (1 if owner in ROW and parts[-1] == "weight" else None)
        elif isinstance(module, torch.nn.Embedding) and parts[0] != "pos_emb" or parts[0] == "lm_head":
            tp_dim = 0  # vocab-parallel
        elif parts[0] == "pos_emb":
            tp_dim = 0
        else:
            tp_dim = None
        if layer is not None:
            part = "block"
        elif id(p) in tied:
            part = "tied"
        else:
            part = "first" if parts[0] in first else ("last" if parts[0] in last else "first")
        decay = p.dim() >= 2 and not isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm))
        out.append(Param(name, tuple(p.shape), tp_dim, layer, part, decay))
    return tuple(out)


def n_params(model_cfg: ModelConfig) -> int:
    return global_numel(model_params(model_cfg))


_HEAD_COST: dict[tuple, float] = {}


def head_cost(model_cfg: ModelConfig, seq_len: int) -> float:
    """The head and loss's training FLOPs in blocks (what the default pipeline split weighs the last stage by)."""
    key = (model_key(model_cfg), seq_len)
    if key not in _HEAD_COST:
        _HEAD_COST[key] = head_cost_in_blocks(meta_model(model_cfg), seq_len)
    return _HEAD_COST[key]


def stage_params(params: tuple[Param, ...], plan: PipelinePlan | None, stage: int | None) -> list[Param]:
    """The parameters a pipeline stage holds (all of them without a pipeline); a tied head is copied on the last."""
    if plan is None:
        return list(params)
    layers = set(plan.layers(stage))
    is_first, is_last = stage == 0, stage == plan.n_stages - 1
    held = {"block": False, "first": is_first, "last": is_last, "tied": is_first or is_last}  # tied: a copy on the last
    return [p for p in params if (p.layer in layers if p.part == "block" else held[p.part])]


_RANK_PARAMS: dict[tuple, tuple[Param, ...]] = {}


def rank_params(model_cfg: ModelConfig, plan: PipelinePlan | None, pp_rank: int) -> tuple[Param, ...]:
    """The parameters of every stage pp rank `pp_rank` holds, in stage order (one tuple per model, split and rank, so
    the sums below are looked up rather than recounted)."""
    params = model_params(model_cfg)
    if plan is None:
        return params
    key = (model_key(model_cfg), plan.split, plan.stage_rank, pp_rank)
    if key not in _RANK_PARAMS:
        _RANK_PARAMS[key] = tuple(p for st in plan.stages_of(pp_rank) for p in stage_params(params, plan, st))
    return _RANK_PARAMS[key]


def per_params(fn: Callable) -> Callable:
    """Caches `fn(params, *args)` by the identity of the `params` sequence (kept alive by the cache, so its id
    cannot be reused) and the other arguments."""
    cache: dict[tuple, tuple] = {}

    @functools.wraps(fn)
    def cached(params: Sequence[Param], *args):
        key = (id(params), *args)
        hit = cache.get(key)
        if hit is None or hit[0] is not params:
            hit = cache[key] = (params, fn(params, *args))
        return hit[1]

    return cached


def _numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


@per_params
def global_numel(params: Sequence[Param]) -> int:
    return _numel(p.shape for p in params)


@per_params
def local_numel(params: Sequence[Param], tp: int) -> int:
    """Elements of the rank's tp shard of `params`."""
    return _numel(p.local_shape(tp) for p in params)


@per_params
def fsdp_shard(params: Sequence[Param], tp: int, dp: int) -> int:
    """FSDP2's per-rank numel of the tp shard: dim 0 split in ceil(d0 / dp) rows (the padding is allocated on every
    rank)."""
    return sum(math.ceil(s[0] / dp) * math.prod(s[1:]) if s else 1 for s in (p.local_shape(tp) for p in params))


@per_params
def root_and_block_numel(params: Sequence[Param], tp: int) -> tuple[int, float]:
    """(elements outside the blocks, mean elements of one block), of the tp shard: what FSDP2's ZeRO-3 holds
    gathered at the start of backward."""
    root = _numel(p.local_shape(tp) for p in params if p.part != "block")
    blocks = [p for p in params if p.part == "block"]
    return root, _numel(p.local_shape(tp) for p in blocks) / max(1, len({p.layer for p in blocks}))


@per_params
def split_embedding_grads(params: Sequence[Param], tp: int) -> int:
    """Bytes by which ddp's fp32 gradient of an untied vocab- or position-parallel embedding exceeds its shard (the
    gradient is a shard of a whole-size tensor)."""
    return sum(4 * math.prod(p.shape) * (tp - 1) // tp for p in params if p.part == "first" and p.tp_dim is not None)


@per_params
def largest(params: Sequence[Param]) -> int:
    return max((math.prod(p.shape) for p in params), default=0)


@per_params
def zero3_partition(params: Sequence[Param], dp: int, threshold: int) -> tuple[int, int]:
    """DeepSpeed ZeRO-3: (the rank's 1/dp partition of every parameter, elements of the parameters at or under the
    persistence threshold, which every rank also keeps whole)."""
    part = sum(math.ceil(math.prod(p.shape) / dp) for p in params)
    return part, _numel(p.shape for p in params if math.prod(p.shape) <= threshold)


@per_params
def zero12_partition(params: Sequence[Param], dp: int) -> tuple[int, int]:
    """DeepSpeed ZeRO-1/2: (the rank's partition of the flat fp32 state, the most elements any rank's gradient buffer
    holds). Each weight-decay group is flattened, padded to a multiple of 2 dp and split in dp equal partitions; a
    rank's gradient buffer holds every parameter that reaches into its partition, whole."""
    part, grads = 0, [0] * (dp + 1)  # grads as differences: a parameter adds to a range of ranks
    for decay in (True, False):
        sizes = [math.prod(p.shape) for p in params if p.decay == decay]
        padded = math.ceil(sum(sizes) / (2 * dp)) * 2 * dp
        size = padded // dp
        part += size
        start = 0
        for k in sizes:
            if size and k:  # the ranks whose [r * size, (r + 1) * size) meets [start, start + k)
                grads[start // size] += k
                grads[min(dp, (start + k - 1) // size + 1)] -= k
            start += k
    held, most = 0, 0
    for r in range(dp):
        held += grads[r]
        most = max(most, held)
    return part, most
