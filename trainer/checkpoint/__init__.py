"""Checkpoints: written whole into a temporary directory, renamed into place, then the `latest` pointer moves.

Layout of `checkpoints/step_<N>/`:
- `dcp/`: model and optimizer state through torch.distributed.checkpoint, keyed by parameter name; every rank writes
  its own shards (plus the engine's small extras such as the fp16 loss scale), so a run saved with one layout (engine,
  world size, tp degree) resumes with another, and `load_model` consolidates it on one CPU process.
- `rng_dp<R>.pt`: the RNG states of data-parallel rank R (dropout streams differ per dp rank, tp peers share one).
- `state.json`: step, token counters, data position, W&B run id, model config, the resolved run config, and the
  sha256 of the tokenizer file (part of the data contract: a resume with another tokenizer is refused).
- `tokenizer.json`: a copy, so `trainer export` and `load_model` need nothing but this directory.
- `manifest.json`: written last, once every rank's files are on disk: every other file with its size.
A crash mid-save leaves only a `.tmp_step_<N>` directory, which the next start removes (under the run directory's
lock, so it cannot be a live job's). Nothing is trusted before it is verified (trainer/integrity.py): a damaged
newest checkpoint is moved aside as `damaged_step_<N>` and the run resumes from the newest complete one.

The package, one job per module: `directory` (step directories, the `latest` pointer, which checkpoint is complete
and which to resume from), `checkpointer` (the `Checkpointer`: save and resume, collectively over all ranks),
`failures` (what went wrong in a write: a full disk, which rank), `state` (RNG streams, `state.json`, the tokenizer
hash, whether a saved model is this one), `consolidate` (`load_model`: one whole CPU model for export and
inference).
"""

from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.consolidate import load_model
from trainer.checkpoint.directory import (
    DAMAGED_PREFIX,
    LATEST,
    candidates,
    complete_checkpoints,
    latest_checkpoint,
    read_pointer,
    resolve_checkpoint_dir,
    step_dirs,
)
from trainer.checkpoint.failures import agree, is_disk_full, write_failure
from trainer.checkpoint.state import file_sha256, read_state, rng_file_name, rng_state, same_model, set_rng_state

__all__ = [
    "DAMAGED_PREFIX",
    "LATEST",
    "Checkpointer",
    "agree",
    "candidates",
    "complete_checkpoints",
    "file_sha256",
    "is_disk_full",
    "latest_checkpoint",
    "load_model",
    "read_pointer",
    "read_state",
    "resolve_checkpoint_dir",
    "rng_file_name",
    "rng_state",
    "same_model",
    "set_rng_state",
    "step_dirs",
    "write_failure",
]
