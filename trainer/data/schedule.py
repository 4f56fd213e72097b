"""Where each global sample comes from: its source (the mixture), and for a raw source its stream and its index in
that stream; for a prepared source its index in the source. Every process computes this alike from a data position;
it costs a few microseconds per global sample and reads no data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trainer.data.order import Mixture


@dataclass(frozen=True)
class Layout:
    """The fixed shape of the order: source names, weights, which are raw, and the number of logical streams."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    raw: tuple[bool, ...]
    streams: int


class ScheduleCursor:
    """Steps through global samples from a data position: `advance()` -> (g, source, stream, index)."""

    def __init__(self, layout: Layout, next_sample: int, mixture: dict | None, stream_counts: dict) -> None:
        self.layout = layout
        mixture = mixture or {}
        self.mixture = Mixture(
            dict(zip(layout.names, layout.weights)), next_sample, mixture.get("counts"), mixture.get("segment")
        )
        # next index of every stream of every raw source: stream l of source s has served counts[s][l] samples
        self.counts = {s: list(stream_counts.get(s, [0] * layout.streams)) for s, raw in enumerate(layout.raw) if raw}

    @property
    def next_sample(self) -> int:
        return self.mixture.next

    def advance(self) -> tuple[int, int, int, int]:
        g = self.mixture.next
        s = self.mixture.take()
        if self.layout.raw[s]:
            stream = g % self.layout.streams
            index = self.counts[s][stream]
            self.counts[s][stream] += 1
            return g, s, stream, index
        return g, s, -1, self.mixture.counts[s] - 1


def rank_samples(cursor: ScheduleCursor, dp_rank: int, dp_size: int) -> Iterator[tuple[int, int, int, int]]:
    """The samples of data-parallel rank `dp_rank` from the cursor on (the cursor advances through all of them)."""
    while True:
        item = cursor.advance()
        if item[0] % dp_size == dp_rank:
            yield item


@dataclass(frozen=True)
class BlockNeeds:
    """The blocks of raw streams rank `dp_rank` needs, in the order it first needs them, each with the global sample
    that first needs it (picklable: DataLoader workers each compute it)."""

    layout: Layout
    next_sample: int
    mixture: dict | None
    stream_counts: dict
    dp_rank: int
    dp_size: int
    block: int

    def __call__(self) -> Iterator[tuple[tuple[int, int], int, int]]:
        cursor = ScheduleCursor(self.layout, self.next_sample, self.mixture, self.stream_counts)
        current: dict[tuple[int, int], int] = {}  # the block each stream is at
        for g, s, stream, index in rank_samples(cursor, self.dp_rank, self.dp_size):
            if stream < 0:
                continue
            key, block = (s, stream), index // self.block
            if current.get(key) != block:  # (a rank may skip blocks when dp does not divide the streams)
                current[key] = block
                yield key, block, g
