"""The bridge from a run's config to the data layer: its sources, its stream for a data-parallel rank (training or
evaluation order), a one-line description, and the global position gathered from every rank for a checkpoint."""

from __future__ import annotations

import torch.distributed as dist

from trainer.config import Config
from trainer.data.sample_stream import SampleStream, build_stream, merge_states
from trainer.data.sources import Source, parse_sources
from trainer.errors import UserError
from trainer.models import family


def data_sources(cfg: Config) -> tuple[list[Source], list[Source]]:
    """The train and valid sources of the config (paths resolved, formats detected: errors before anything starts)."""
    d = cfg.data
    train = parse_sources(d.train, d.format, d.text_field)
    valid = parse_sources(d.valid, d.format, d.text_field, key="data.valid") if d.valid else []
    if d.valid_fraction:
        if len(train) != 1 or not train[0].raw:
            what = f"{len(train)} sources" if len(train) != 1 else train[0].label()
            raise UserError(
                f"data.valid_fraction holds out documents of one raw source (text, jsonl, parquet, datasets), and "
                f"data.train is {what}: give data.valid instead"
            )
        valid = train
    return train, valid


def describe_data(cfg: Config, sources: list[Source], dp: int) -> str:
    """One line: the sources with their shares and formats, the order, and what each rank reads."""
    total = sum(src.weight for src in sources)
    parts = [
        f"{src.name} {100 * src.weight / total:.0f}% ({src.fmt}, {src.describe() if src.fmt == 'dataset' else len(src.paths)}"
        f"{'' if src.fmt == 'dataset' else ' file' + ('s' if len(src.paths) > 1 else '')})"
        for src in sources
    ]
    L = cfg.data.streams
    share = f"{L // dp} per rank" if L % dp == 0 else "every rank reads all: not a multiple of dp"
    order = "shuffled" if cfg.data.shuffle else "corpus order"
    return f"data: {', '.join(parts)} | {order}, {L} streams per raw source ({share}), {cfg.data.num_workers} worker(s)"


def build_data_stream(
    cfg: Config,
    dims,
    sources: list[Source],
    *,
    training: bool,
    state: dict | None = None,
    num_workers: int = 0,
    micro_batch: int,
    start_sample: int = 0,
) -> SampleStream:
    """The micro-batches of `sources` for data-parallel rank `dims.dp_rank` of `dims.dp`: the training order (shuffled,
    from the saved position `state`) or the evaluation order (never shuffled, from the start; the held-out documents
    under valid_fraction). What a sample is (next-token or masked) is the model family's objective."""
    d = cfg.data
    holdout = (d.valid_fraction, not training) if d.valid_fraction else None
    return build_stream(
        sources,
        tokenizer_path=d.tokenizer,
        objective=family(cfg.model.arch).objective,
        seq_len=d.seq_len,
        seed=cfg.run.seed,
        dp_rank=dims.dp_rank,
        dp_size=dims.dp,
        micro_batch=micro_batch,
        shuffle=d.shuffle and training,
        streams=d.streams,
        block=d.shuffle_block if training else 1,  # unshuffled, blocks only add read-ahead: evaluation reads little
        num_workers=num_workers,
        bad_lines=d.bad_lines,
        state=state or None,
        holdout=holdout,
        start_sample=start_sample,
        warn=training,
    )


def gather_data_state(stream: SampleStream, world_size: int) -> dict:
    """The global data position: every rank knows the cursors of its own logical streams only."""
    local = stream.state_dict()
    if world_size == 1 or not dist.is_initialized():
        return merge_states([local])
    states: list = [None] * world_size
    dist.all_gather_object(states, local)
    return merge_states(states)
