"""The small per-checkpoint state beside the DCP payload: RNG streams (`rng_dp<R>.pt`), `state.json`, the
tokenizer's hash, and whether a saved model config describes the model of this run."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.integrity import STATE_FILE


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks: how a checkpoint names the tokenizer it was trained with."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    """This process's torch, Python (and CUDA) RNG states, saved so dropout continues exactly on resume."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what `rng_state` saved (the CUDA state only where there is a GPU)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file_name(dp_rank: int, pp_rank: int = 0) -> str:
    """Each pipeline stage of a data-parallel rank draws its own dropout masks: stage 0's file keeps the name every
    other layout reads."""
    return f"rng_dp{dp_rank}.pt" if pp_rank == 0 else f"rng_dp{dp_rank}_pp{pp_rank}.pt"


def same_model(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's `model_config` describes the model `now` (keys older versions saved and the family
    dropped, with the value they always held, do not count)."""
    from trainer.models import config_from_dict

    try:
        return config_from_dict(saved).to_dict() == now
    except (UserError, TypeError):
        return False


def read_state(path: Path) -> dict:
    """A checkpoint's `state.json`: step, counters, data position, model and run config."""
    return json.loads((path / STATE_FILE).read_text())
