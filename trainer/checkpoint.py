"""Checkpoints: written whole into a temporary directory, renamed into place, then the `latest` pointer moves.

Layout of `checkpoints/step_<N>/`:
- `model.pt`, `optimizer.pt`: consolidated state dicts (ddp keeps a full replica on every rank; rank 0 writes them).
- `rng_rank<R>.pt`: each rank's RNG states (dropout streams differ per rank).
- `state.json`: step, token counters, data position, W&B run id, model config, the resolved run config.
- `tokenizer.json`: a copy, so `trainer export` and `load_model` need nothing but this directory.
A crash mid-save leaves only a `.tmp_step_<N>` directory, which the next start removes; `latest` names the newest
complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from trainer.errors import UserError
from trainer.parallel import barrier, broadcast_object

STATE_FILE = "state.json"
LATEST = "latest"


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step_*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        target = ckpt_root / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accepts a checkpoint directory, a run's `checkpoints/` directory, or a run directory."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise UserError(f"no complete checkpoint at {p}: give a checkpoints/step_<N> directory of a run")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores everything with state, collectively over all ranks."""

    def __init__(self, root: Path, keep: int, rank: int, world_size: int) -> None:
        self.root = root
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def clean_partial(self) -> None:
        """Removes half-written checkpoints a crash left behind."""
        if self.rank == 0 and self.root.is_dir():
            for tmp in self.root.glob(".tmp_step_*"):
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()

    def save(self, step: int, engine_state: dict, state: dict, tokenizer_path: str | None) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            torch.save(engine_state["model"], tmp / "model.pt")
            torch.save({k: v for k, v in engine_state.items() if k != "model"}, tmp / "optimizer.pt")
            if tokenizer_path:
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            (tmp / STATE_FILE).write_text(json.dumps({**state, "world_size": self.world_size}, indent=1))
        barrier()
        if self.rank == 0:
            for path in tmp.iterdir():  # flush file contents before the rename makes the checkpoint visible
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, self.root / LATEST)
            for old in complete_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def find_resume(self, resume: str) -> Path | None:
        if resume == "never":
            return None
        if resume == "auto":
            found = latest_checkpoint(self.root) if self.rank == 0 else None
            found = broadcast_object(str(found) if found else None)
            return Path(found) if found else None
        path = Path(resume)
        if not path.exists():
            raise UserError(f"checkpoint.resume={resume} does not exist: give a checkpoint directory, auto or never")
        return resolve_checkpoint_dir(path)

    def load(self, path: Path, model_config: dict) -> tuple[dict, dict, dict | None]:
        """Returns (engine state, trainer state, this rank's RNG state or None when the checkpoint has none for it,
        as after a resume on more ranks). The caller sets the RNG right before the first step."""
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("model_config") != model_config:
            saved, now = state.get("model_config", {}), model_config
            diff = ", ".join(
                f"{k}: {saved.get(k)} -> {now.get(k)}"
                for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)
            )
            raise UserError(
                f"checkpoint {path} holds another model shape ({diff}); match model.* to it or start "
                f"a fresh run (checkpoint.resume=never or another run.dir)"
            )
        engine_state = {
            "model": torch.load(path / "model.pt", map_location="cpu", weights_only=True),
            **torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        }
        rng_file = path / f"rng_rank{self.rank}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
        return engine_state, state, rng


def load_model(checkpoint_dir: str | Path) -> nn.Module:
    """The trained model from a checkpoint, consolidated on CPU, in eval mode."""
    from trainer.models import ModelConfig, model_from_config

    path = resolve_checkpoint_dir(checkpoint_dir)
    state = json.loads((path / STATE_FILE).read_text())
    model = model_from_config(ModelConfig(**state["model_config"]))
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()
