"""`model.init_from`: start a run from a Hugging Face checkpoint directory (config.json + safetensors, one file or
shards with their index). The family's adapter (trainer/models/<family>/hf.py) gives the names and conversions; the
dimensions come from config.json. Each rank reads only what it holds: a one-to-one tensor of a sharded parameter
(FSDP, tensor parallel) is read as the rank's slice, straight from the file; a converted one (GPT-2's fused,
transposed q/k/v) is read whole, one tensor at a time, and sliced. Under DeepSpeed ZeRO-3 rank 0 reads each
parameter whole, one at a time, into its gathered form, and DeepSpeed partitions it again.

A padded vocabulary (model.vocab_multiple: the run's embedding and head have more rows than the checkpoint's
vocab_size) gets zeros in the padding rows. Zero rather than small random values: no token id looks those rows up and
their logits are masked to -inf, so no gradient ever reaches them and they stay exactly zero through training; the
trained model is then the checkpoint's model with nothing added, and `trainer export` drops them again.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from trainer.errors import UserError
from trainer.models import ModelConfig, family
from trainer.models.hf import HFCheckpoint, read_config
from trainer.models.registry import ARCHS
from trainer.parallel import unwrapped

IGNORED = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")  # buffers older Hugging Face saves kept


def hf_model_dims(directory: str | Path, arch: str, given: dict, preset: str | None) -> dict:
    """Our dims for the checkpoint in `directory` (its config.json), refusing in one line an `architectures` entry
    the family of `arch` does not read, a preset beside it, or a dimension in `given` that contradicts it."""
    directory = Path(directory)
    config = read_config(directory)
    entry = (config.get("architectures") or [None])[0]
    adapter = family(arch).adapter
    if entry not in adapter.architectures:
        readers = [a for a in ARCHS if entry in family(a).adapter.architectures]
        fix = f"set model.arch={readers[0]}" if readers else "no family of this trainer reads it"
        raise UserError(f"{directory / 'config.json'}: architectures {entry!r} is not a {arch} model: {fix}")
    if preset is not None:
        raise UserError(
            f"model.preset={preset} and model.init_from={directory} both set the model's dimensions: remove model.preset"
        )
    try:
        dims = adapter.config_from_hf(config)
    except KeyError as e:
        raise UserError(f"{directory / 'config.json'} lacks {e.args[0]!r}, which a {entry} config has") from None
    for key, value in given.items():
        if key in dims and value is not None and value != dims[key]:
            raise UserError(
                f"model.{key}={value} contradicts model.init_from={directory} ({key} {dims[key]} in its config.json): "
                f"remove model.{key}"
            )
    return {**given, **dims}


def _names(model: nn.Module) -> dict[str, nn.Parameter]:
    return {unwrapped(name): p for name, p in model.named_parameters()}


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def _hf_shape(entry, shapes: list[tuple[int, ...]], vocab_size: int) -> tuple[int, ...]:
    if entry.vocab_rows:  # ours is padded, theirs holds the tokens only
        return (vocab_size, *shapes[0][1:])
    if entry.conversion == "same":
        return shapes[0]
    if entry.conversion == "t":
        return tuple(reversed(shapes[0]))
    joined = (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(reversed(joined)) if entry.conversion == "cat_t" else joined


def check_checkpoint(ckpt: HFCheckpoint, cfg: ModelConfig, params: dict[str, torch.Tensor]) -> list:
    """The adapter's entries for `cfg` whose parameters `params` holds (all of them but on a pipeline stage), once
    every tensor is known present with its shape and nothing is left over."""
    entries = family(cfg.arch).adapter.entries(cfg)
    held = [e for e in entries if all(o in params for o in e.ours)]
    have = ckpt.names()
    expected = {e.hf for e in entries}
    file_of = ckpt.weight_map
    for e in entries:
        if e.hf not in have:
            raise UserError(f"{ckpt.directory}: tensor {e.hf} is missing (a {cfg.arch} model of this shape has it)")
        if e not in held:  # a pipeline stage: verify() checked the whole model's shapes
            continue
        shape = _hf_shape(e, [_global_shape(params[o]) for o in e.ours], cfg.vocab_size)
        if ckpt.shape(e.hf) != shape:
            raise UserError(
                f"{ckpt.directory / file_of[e.hf]}: tensor {e.hf} has shape {list(ckpt.shape(e.hf))}, the model "
                f"config.json describes needs {list(shape)}"
            )
    tied_head = {"lm_head.weight"} if cfg.tied_head else set()  # some saves keep the tied copy too
    extra = sorted(n for n in have - expected - tied_head if not IGNORED.search(n))
    if extra:
        raise UserError(
            f"{ckpt.directory / file_of[extra[0]]}: tensor {extra[0]} is not part of a {cfg.arch} model of this "
            f"config ({len(extra)} such tensors): the checkpoint does not match its config.json"
        )
    return held


def verify(directory: str | Path, cfg: ModelConfig) -> None:
    """Every tensor the model needs is in the checkpoint with its shape, and nothing else is (headers only: before
    the run writes anything)."""
    from trainer.models import model_from_config

    with torch.device("meta"):
        params = _names(model_from_config(cfg))
    check_checkpoint(HFCheckpoint(directory), cfg, params)


def _read(ckpt: HFCheckpoint, entry, index: tuple[slice, ...], vocab_size: int) -> torch.Tensor:
    """`index` (a slice per dimension of our parameter) of a one-to-one tensor; for a vocabulary entry, the rows past
    the checkpoint's `vocab_size` (padding) are zeros."""
    if not entry.vocab_rows:
        return ckpt.read(entry.hf, index)
    rows, rest = index[0], index[1:]
    stored = slice(min(rows.start, vocab_size), min(rows.stop, vocab_size))
    part = ckpt.read(entry.hf, (stored, *rest)) if stored.stop > stored.start else None
    if part is None:
        return torch.zeros(rows.stop - rows.start, *(s.stop - s.start for s in rest))
    pad = (rows.stop - rows.start) - part.shape[0]
    return torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part


def _whole(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


@torch.no_grad()
def load_hf_weights(model: nn.Module, directory: str | Path, aliases: dict[str, str] | None = None) -> None:
    """Copies the checkpoint's weights into `model` (as the engine materialised it: whole, DTensor shards, or DeepSpeed
    ZeRO-3 partitions); every rank calls it. A pipeline stage gets the tensors of the parameters it holds, its copy of
    a tied head (`aliases`: {"lm_head.weight": "tok_emb.weight"}) the embedding's."""
    ckpt = HFCheckpoint(directory)
    params = _names(model)
    for alias, name in (aliases or {}).items():
        if alias in params and name not in params:
            params[name] = params[alias]
    vocab_size = model.config.vocab_size
    entries = check_checkpoint(ckpt, model.config, params)
    for e in entries:
        targets = [params[o] for o in e.ours]
        if hasattr(targets[0], "ds_id"):  # DeepSpeed ZeRO-3: gathered, written by rank 0, partitioned again
            import deepspeed

            with deepspeed.zero.GatheredParameters(targets, modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    whole = _read(ckpt, e, _whole(targets[0].shape), vocab_size) if e.vocab_rows else ckpt.read(e.hf)
                    for t, value in zip(targets, e.from_hf(whole)):
                        t.copy_(value)
            continue
        if e.conversion == "same" and isinstance(targets[0], DTensor):
            p = targets[0]
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            p.to_local().copy_(_read(ckpt, e, index, vocab_size))
            continue
        whole = _read(ckpt, e, _whole(_global_shape(targets[0])), vocab_size) if e.vocab_rows else ckpt.read(e.hf)
        for t, value in zip(targets, e.from_hf(whole)):
            if isinstance(t, DTensor):
                shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
                value = value[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                t = t.to_local()
            t.copy_(value)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
