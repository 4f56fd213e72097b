"""Checkpoints: written whole into a temporary directory, renamed into place, then the `latest` pointer moves.

Layout of `checkpoints/step_<N>/`:
- `dcp/`: model and optimizer state through torch.distributed.checkpoint, keyed by parameter name; every rank writes
  its own shards (plus the engine's small extras such as the fp16 loss scale), so a run saved with one layout (engine,
  world size, tp degree) resumes with another, and `load_model` consolidates it on one CPU process.
- `rng_dp<R>.pt`: the RNG states of data-parallel rank R (dropout streams differ per dp rank, tp peers share one).
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
import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.engines import check_payload
from trainer.engines.base import DCP_DIR, Engine, fsync
from trainer.errors import UserError
from trainer.parallel import ParallelDims, barrier, broadcast_object

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

    def __init__(self, root: Path, keep: int, dims: ParallelDims) -> None:
        self.root = root
        self.keep = keep
        self.dims = dims

    def clean_partial(self) -> None:
        """Removes half-written checkpoints a crash left behind."""
        if self.dims.is_main and self.root.is_dir():
            for tmp in self.root.glob(".tmp_step_*"):
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()

    def save(self, step: int, engine: Engine, state: dict, tokenizer_path: str | None) -> Path:
        """Every rank writes its part into `.tmp_step_<N>` and fsyncs it; after a barrier rank 0 renames the
        directory into place and moves `latest`."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if self.dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)  # collective; DCP fsyncs every file it writes
        written = []
        if self.dims.tp_rank == 0:  # tp peers share one RNG stream (same dropout masks)
            written.append(tmp / f"rng_dp{self.dims.dp_rank}.pt")
            torch.save(rng_state(), written[-1])
        if self.dims.is_main:
            if tokenizer_path:
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
                written.append(tmp / "tokenizer.json")
            layout = {"world_size": self.dims.world_size, "dp": self.dims.dp, "tp": self.dims.tp}
            (tmp / STATE_FILE).write_text(json.dumps({**state, **layout}, indent=1))
            written.append(tmp / STATE_FILE)
        for path in written:  # each rank flushes its own files before the rename can make them visible
            fsync(path)
        barrier()
        if self.dims.is_main:
            fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / f".{LATEST}.tmp"
            pointer_tmp.write_text(final.name)
            fsync(pointer_tmp)
            os.replace(pointer_tmp, self.root / LATEST)
            fsync(self.root)
            for old in complete_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def find_resume(self, resume: str) -> Path | None:
        if resume == "never":
            return None
        if resume == "auto":
            found = latest_checkpoint(self.root) if self.dims.is_main else None
            found = broadcast_object(str(found) if found else None)
            return Path(found) if found else None
        path = Path(resume)
        if not path.exists():
            raise UserError(f"checkpoint.resume={resume} does not exist: give a checkpoint directory, auto or never")
        return resolve_checkpoint_dir(path)

    def check_resume(self, path: Path, model_config: dict, engine: str, zero_stage: int) -> dict:
        """The checkpoint's state, once it is known that this run can continue it (same model shape, an engine that
        reads its payload); raised before anything is built or written."""
        state = read_state(path)
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
        check_payload(path, engine, zero_stage)
        return state

    def load(self, path: Path, engine: Engine) -> dict | None:
        """Loads the engine's state (saved by any layout the engine reads) and returns this data-parallel rank's RNG
        state, or None when the checkpoint has none for it (as after a resume on more ranks). The caller sets the
        RNG right before the first step."""
        engine.load(path)
        rng_file = path / f"rng_dp{self.dims.dp_rank}.pt"
        return torch.load(rng_file, weights_only=False) if rng_file.is_file() else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load_model(checkpoint_dir: str | Path) -> nn.Module:
    """The trained model from a checkpoint, consolidated on CPU, in eval mode."""
    from trainer.engines.deepspeed import PAYLOAD_DIR as DS_PAYLOAD_DIR
    from trainer.engines.deepspeed import consolidate as consolidate_deepspeed
    from trainer.models import ModelConfig, model_from_config

    path = resolve_checkpoint_dir(checkpoint_dir)
    model = model_from_config(ModelConfig(**read_state(path)["model_config"]))
    if (path / DS_PAYLOAD_DIR).is_dir():  # DeepSpeed's zero_to_fp32 gathers any ZeRO stage's partitions
        model.load_state_dict(consolidate_deepspeed(path))
    else:  # DCP reads the shards of any layout (ddp, fsdp, tp, any world size) into this one whole CPU model
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=True)
        model.load_state_dict(state["model"])
    model.tie_weights()
    return model.eval()
