"""Hugging Face checkpoints, both ways, for every family: one table of names per family (`Adapter.table`) serves
export (`to_hf`) and import (`from_hf`, `HFCheckpoint`).

An entry maps one Hugging Face tensor to one or more of ours, with a conversion that is its own inverse's partner:
- `same`: the tensor as it is;
- `t`: transposed (GPT-2's Conv1D keeps weights as (in, out));
- `cat`: ours concatenated on dim 0 (GPT-2's fused q/k/v bias); `cat_t`: concatenated, then transposed (its weight).
`{i}` in a name stands for the block index. An entry with `vocab_rows` has the vocabulary as its first dimension:
ours has padded_vocab_size rows (model.vocab_multiple), Hugging Face's vocab_size; export drops the padding rows and
import fills them with zeros.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    hf: str
    ours: tuple[str, ...]
    conversion: str = "same"  # same | t | cat | cat_t
    vocab_rows: bool = False  # dim 0 is the vocabulary (conversion "same"): padding rows are ours only

    def expand(self, n_layer: int) -> list[Entry]:
        if "{i}" not in self.hf:
            return [self]
        return [
            Entry(self.hf.format(i=i), tuple(o.format(i=i) for o in self.ours), self.conversion, self.vocab_rows)
            for i in range(n_layer)
        ]

    def to_hf(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.conversion == "same":
            return tensors[0]
        if self.conversion == "t":
            return tensors[0].t()
        joined = torch.cat(tensors, dim=0)
        return joined.t() if self.conversion == "cat_t" else joined

    def from_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.conversion == "same":
            return [tensor]
        if self.conversion == "t":
            return [tensor.t()]
        if self.conversion == "cat_t":
            tensor = tensor.t()
        return list(tensor.chunk(len(self.ours), dim=0))


@dataclass(frozen=True)
class Adapter:
    """A family's Hugging Face layout. `architectures`: the `architectures` entries it reads (the first is written).
    `config_to_hf(cfg)` -> config.json keys; `config_from_hf(config.json)` -> our dims; `table(cfg)` -> entries
    (a config decides some of them, e.g. an untied head); `special_ids(ids)` -> extra config.json keys."""

    architectures: tuple[str, ...]
    config_to_hf: Callable[[object], dict]
    config_from_hf: Callable[[dict], dict]
    table: Callable[[object], list[Entry]]
    special_ids: Callable[[dict], dict] = lambda ids: {}

    def entries(self, cfg) -> list[Entry]:
        return [e for entry in self.table(cfg) for e in entry.expand(cfg.n_layer)]


SPECIAL_KEYS = ("bos", "eos", "pad")


def special_token_ids(ids: dict | None) -> dict[str, int]:
    """{"bos"|"eos"|"pad" (or "eos_id", "eos_token_id", ...): id} -> config.json's `*_token_id` keys (others dropped:
    config.json has no field for them)."""
    out: dict[str, int] = {}
    for key, value in (ids or {}).items():
        short = key.removesuffix("_token_id").removesuffix("_id")
        if short in SPECIAL_KEYS and value is not None:
            out[f"{short}_token_id"] = int(value)
    return out


def to_hf(state: dict[str, torch.Tensor], cfg, adapter: Adapter) -> dict[str, torch.Tensor]:
    """Our (unwrapped) state dict -> Hugging Face tensors, each stored once; a padded vocabulary trimmed back to
    vocab_size rows (the padding rows are no token; a copy, not a view into the padded tensor)."""
    n = cfg.vocab_size
    return {
        e.hf: e.to_hf([state[o][:n].clone() if e.vocab_rows and len(state[o]) > n else state[o] for o in e.ours])
        for e in adapter.entries(cfg)
    }


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"model.init_from={directory} has no {CONFIG_FILE}: give a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-download or re-export the checkpoint") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object: re-download or re-export the checkpoint")
    return config


class HFCheckpoint:
    """The tensors of a Hugging Face checkpoint directory (one `model.safetensors`, or shards named by
    `model.safetensors.index.json`), opened lazily: a tensor, or a slice of one, is read only when asked for."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        self.config = read_config(self.directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a safetensors index ({e}): re-download the checkpoint") from None
        elif (self.directory / WEIGHTS_FILE).is_file():
            weight_map = None
        else:
            raise UserError(
                f"model.init_from={self.directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}: give a Hugging Face "
                f"checkpoint directory with safetensors weights"
            )
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_FILE]
        self._files = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise UserError(f"{index} names shard {name}, which is missing from {self.directory}")
            try:
                self._files[name] = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
                raise UserError(f"{path} is not a readable safetensors file ({e}): re-download it") from None
        if weight_map is None:
            weight_map = {key: WEIGHTS_FILE for key in self._files[WEIGHTS_FILE].keys()}  # noqa: SIM118
        self.weight_map = weight_map

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[self.weight_map[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor `name`, or only `index` of it (a slice per dimension) when given."""
        handle = self._files[self.weight_map[name]]
        try:
            if index is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[index]
        except Exception as e:  # noqa: BLE001 - a truncated file fails here, on the first read past its end
            raise UserError(
                f"{self.directory / self.weight_map[name]}: tensor {name} cannot be read ({e}); the file is "
                f"damaged or truncated: re-download it"
            ) from None
