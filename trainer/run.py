"""What one rank holds for a run once it is built (`Run`), the counters saved with every checkpoint (`TrainState`),
and the checkpoint payload around the engine's state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.checkpoint import Checkpointer, file_sha256
from trainer.config import Config
from trainer.data import SampleStream, Source
from trainer.data.from_config import gather_data_state
from trainer.engines import Engine
from trainer.metrics import PeakMeter
from trainer.models import Family, ModelConfig
from trainer.monitor import MetricsLogger
from trainer.parallel import ParallelDims
from trainer.tokenizer import TokenizerInfo


@dataclass
class TrainState:
    """Counters saved in every checkpoint besides model, optimizer and RNG."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (global)
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss or gradient
    data: dict = field(default_factory=dict)  # the train stream's position (empty: the beginning)
    wandb_run_id: str | None = None


@dataclass
class Run:
    """Everything one rank builds from the config before the first step."""

    cfg: Config
    dims: ParallelDims
    device: torch.device
    tok: TokenizerInfo
    family: Family
    model_cfg: ModelConfig
    engine: Engine
    ckpt: Checkpointer
    logger: MetricsLogger
    state: TrainState
    rng: dict | None  # the RNG state to continue from, when resuming
    train_sources: list[Source]
    valid_sources: list[Source]  # empty: no evaluation
    flops_per_token: float
    peak: PeakMeter  # the peak FLOP/s of all ranks together, and MFU against it
    stream: SampleStream  # this rank's training batches (workers started before the model was built)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_batch * self.cfg.train.grad_accum * self.dims.dp


def save_checkpoint(run: Run, final: bool = False) -> None:
    """The run's checkpoint at the current step: the engine's state, this rank's RNG, and our state (counters, the
    global data position, the model config, the config, the tokenizer's hash). With checkpoint.async the engine's
    state is written in the background (published by `run.ckpt.poll`/`finish`), except for the `final` one (the end
    of the run, a stop signal), which waits for everything to be on disk."""
    run.state.data = gather_data_state(run.stream, run.dims.world_size)  # at a step boundary: the same everywhere
    saved = {
        "train_state": vars(run.state).copy(),
        "model_config": run.model_cfg.to_dict(),
        "config": run.cfg.to_dict(),
        "tokenizer_sha256": file_sha256(run.tok.path),  # part of the data contract: checked on resume
    }
    path = run.ckpt.save(run.state.step, run.engine, saved, str(run.tok.path), in_background=not final)
    if path is not None:  # written now (None: handed to the background writer)
        run.logger.print(f"checkpoint saved: {path}")
