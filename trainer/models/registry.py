"""The registry: `model.arch` -> the package of its family (each exports `FAMILY`), and resolving a preset plus
overrides into that family's config. Adding a family is a folder under trainer/models/ and one line here."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.models.family import Family, ModelConfig

FAMILIES = {
    "gpt": "trainer.models.gpt",
    "bert": "trainer.models.bert",
    "llama": "trainer.models.llama",
}
ARCHS = tuple(FAMILIES)


def family(arch: str) -> Family:
    """The family `model.arch` names; one line listing the known ones otherwise."""
    if arch not in FAMILIES:
        raise UserError(f"model.arch={arch!r} is unknown; use one of {', '.join(ARCHS)}")
    return importlib.import_module(FAMILIES[arch]).FAMILY


def arch_of_checkpoint(directory: str | Path) -> str:
    """The family that reads the Hugging Face checkpoint in `directory`, from its config.json's `architectures` (what
    `model.arch` is when unset beside `model.init_from`); one line when no family reads it."""
    from trainer.models.hf import CONFIG_FILE, read_config

    entry = (read_config(Path(directory)).get("architectures") or [None])[0]
    readers = [arch for arch in ARCHS if entry in family(arch).adapter.architectures]
    if readers:
        return readers[0]
    known = "; ".join(f"{a}: {', '.join(family(a).adapter.architectures)}" for a in ARCHS)
    if entry is None:
        raise UserError(
            f"{Path(directory) / CONFIG_FILE} names no architectures: set model.arch to the family of the checkpoint "
            f"({known})"
        )
    raise UserError(
        f"{Path(directory) / CONFIG_FILE}: architectures {entry!r} is not a model any family of this trainer reads "
        f"({known})"
    )


VOCAB_MULTIPLE = 128  # a run's default model.vocab_multiple, as Megatron's --make-vocab-size-divisible-by


def run_vocab_multiple(requested: int | None, resumed: int | None, tp: int, vocab_size: int) -> int:
    """The vocab_multiple a run builds its model with: the one requested (model.vocab_multiple), else the one of the
    checkpoint it resumes (`resumed`; 1 for checkpoints saved before padding existed), else VOCAB_MULTIPLE. When
    parallel.tp does not divide the rows that gives, the least common multiple with tp (not Megatron's product: the
    padded vocabulary then stays the same at every tp degree that divides it, any power of two up to 128 by default,
    so a checkpoint resumes at another tp degree). A resumed checkpoint's rows cannot change: refused in one line."""
    multiple = requested if requested is not None else resumed if resumed is not None else VOCAB_MULTIPLE
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise UserError(f"model.vocab_multiple={multiple!r} is invalid; set a positive integer (1: no padding)")
    rows = -(-vocab_size // multiple) * multiple
    if rows % tp == 0:
        return multiple
    if requested is None and resumed is not None:
        raise UserError(
            f"the checkpoint this run resumes has {rows} vocabulary rows (vocab_size {vocab_size}), which "
            f"parallel.tp={tp} does not split evenly: resume with a parallel.tp that divides {rows}, or start a fresh "
            f"run (checkpoint.resume=never or another run.dir), which pads the vocabulary for tp"
        )
    return math.lcm(multiple, tp)


def all_presets() -> dict[str, ModelConfig]:
    return {name: cfg for arch in ARCHS for name, cfg in family(arch).presets.items()}


def check_settings(arch: str, names: list[str]) -> None:
    """Refuses a model.* key the family does not have, naming the family that has it or the closest key."""
    fam = family(arch)
    known = fam.setting_names()
    for name in names:
        if name in known:
            continue
        owners = [a for a in ARCHS if a != arch and name in family(a).setting_names()]
        if owners:
            raise UserError(f"model.{name} is not a {arch} setting (it is {' and '.join(owners)}'s): remove it")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean model.{close[0]}?" if close else f"{arch} settings: {', '.join(known)}"
        raise UserError(f"unknown config key model.{name} ({hint})")


def resolve_model_config(arch: str, preset: str | None = None, **dims: Any) -> ModelConfig:
    """Start from `preset` (or nothing) and apply `dims` overrides (None values are ignored); every error names the
    fix. Overriding `d_model` re-derives what the family derives from it (d_ff, ...) unless those are given too."""
    fam = family(arch)
    dims = {k: v for k, v in dims.items() if v is not None}
    check_settings(arch, list(dims))
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in fam.presets:
            other = next((a for a in ARCHS if a != arch and preset in family(a).presets), None)
            if other:
                raise UserError(
                    f"model.preset={preset!r} is a {other} preset but model.arch={arch!r}; set model.arch={other} or "
                    f"pick one of {', '.join(fam.presets)}"
                )
            close = difflib.get_close_matches(preset, list(fam.presets), n=1, cutoff=0.0)
            raise UserError(
                f"model.preset={preset!r} is unknown; did you mean {close[0]!r}? (presets: {', '.join(fam.presets)})"
            )
        values = dataclasses.asdict(fam.presets[preset])
        if "d_model" in dims:
            for name in fam.config.FROM_D_MODEL:
                if name not in dims:
                    values[name] = None
    values.update(dims)
    required = [f.name for f in dataclasses.fields(fam.config) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise UserError(f"model.{missing[0]} is not set; give a model.preset or set {', '.join(missing)}")
    return fam.config(**values)


def config_from_dict(saved: dict) -> ModelConfig:
    """The config a checkpoint's `model_config` (or `to_dict()`) describes. Keys written by older versions that the
    family no longer has are dropped when they hold the one value they always held."""
    values = dict(saved)
    fam = family(values.pop("arch", None))
    for name, value in fam.config.LEGACY.items():
        if name in values and values[name] == value:
            del values[name]
    return fam.config(**values)
