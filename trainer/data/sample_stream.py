"""The data stream the training loop iterates: micro-batches of this rank's share of the global sample sequence.

Global sample g (see schedule.py) comes from one source, chosen by the mixture. From a prepared source (token shards)
it is the source's j-th sample: with shuffle on, epoch j // N is a permutation of the source's N windows, read at
random by any rank; with shuffle off, window j of the corpus repeated forever. From a raw source it is the next sample
of logical stream g mod L (streams.py). Rank r of dp takes the samples g = r (mod dp); micro-batches are consecutive
groups of micro_batch of them. The position (a checkpoint's `data`) is global: the next global sample, the mixture
counts and, per raw stream, its next index and the cursor of its current block.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.documents import DocumentNumbers, check_read_args
from trainer.data.logical_streams import Block, StreamPlan
from trainer.data.order import Permutation, derive_key
from trainer.data.packing import FROM_TAG, STORED_TAG, SampleSpec
from trainer.data.schedule import BlockNeeds, Layout, ScheduleCursor
from trainer.data.shards import TokenShards
from trainer.data.sources import Source, parse_sources
from trainer.data.units import fingerprint, plan_units
from trainer.data.workers import BlockFeed, BlockSource
from trainer.errors import UserError
from trainer.tokenizer import load_tokenizer

STATE_VERSION = 2
SKIP_PROGRESS_S = 5.0  # reading through the samples before start_sample: a progress line on stderr this often
FRESH_CURSOR = {"block": 0, "unit": 0, "doc": None, "offset": 0}
BYTE_IDS = ("text", "jsonl")  # formats whose document ids are byte offsets (the others': rows)


class PreparedSampler:
    """Sample j of a prepared source: its window, and where it lies (input, document, offset)."""

    def __init__(self, shards: TokenShards, spec: SampleSpec, shuffle: bool, seed: int, fingerprint_: str) -> None:
        self.shards, self.spec, self.shuffle, self.seed, self.fingerprint = shards, spec, shuffle, seed, fingerprint_
        self.per_epoch = (shards.n_tokens - (spec.span - spec.stride)) // spec.stride
        if shuffle and self.per_epoch < 1:
            raise UserError(
                f"{shards.directory} holds {shards.n_tokens} tokens, less than one sample of {spec.span}; use a "
                "larger corpus or a smaller data.seq_len"
            )
        self._perm: tuple[int, Permutation] | None = None

    def position(self, j: int) -> int:
        if not self.shuffle:
            return j * self.spec.stride
        epoch, k = divmod(j, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(self.per_epoch, derive_key(self.seed, self.fingerprint, "epoch", epoch)))
        return self._perm[1][k] * self.spec.stride

    def window(self, j: int) -> np.ndarray:
        return self.shards.window(self.position(j), self.spec.span)

    def origin(self, j: int) -> dict:
        """Where sample j starts: input file, document (see SampleStream.describe), token offset, epoch."""
        name, number, doc_id, offset = self.shards.locate_document(self.position(j))
        if self.shards.meta["reader"]["format"] in BYTE_IDS:  # the raw file is not at hand: its line is unknown
            document = {"document": number, "line": None, "document_byte_offset": doc_id}
        else:
            document = {"document": doc_id, "line": None, "document_byte_offset": None}
        return {"file": name, **document, "offset": offset, "epoch": j // max(self.per_epoch, 1)}


@dataclass
class StreamState:
    """This rank's view of one raw stream: its current block and the cursor it started from."""

    cursor: dict  # cursor of block `cursor["block"]`, valid while no block has been received
    block: Block | None = None


class SampleStream:
    """Iterator of this rank's micro-batches: dicts of LongTensors input_ids (mb, T), labels (mb, T) with -100 =
    ignored, and sample_index (mb,) holding the global sample indices."""

    def __init__(
        self,
        *,
        sources: list[Source],
        samplers: dict[int, PreparedSampler],
        plans: dict[int, StreamPlan],
        spec: SampleSpec,
        cursor: ScheduleCursor,
        feed: BlockSource | None,
        owned: dict[tuple[int, int], StreamState],
        dp_rank: int,
        dp_size: int,
        micro_batch: int,
        block: int,
        settings: dict,
        carried: dict,
        carried_counts: dict,
        fingerprints: dict[int, str],
    ) -> None:
        self.sources, self.samplers, self.plans, self.spec = sources, samplers, plans, spec
        self.cursor, self.feed, self.owned = cursor, feed, owned
        self.dp_rank, self.dp_size, self.micro_batch, self.block = dp_rank, dp_size, micro_batch, block
        self.settings = settings  # seed, shuffle, streams, block: what the order depends on
        self.carried = carried  # saved state of sources no longer configured, kept for a later resume
        self.carried_counts = carried_counts
        self.fingerprints = fingerprints  # per source index: what a resume checks the corpus against
        self._numbers: dict[int, DocumentNumbers] = {}  # per raw text/jsonl source, made by describe()

    def __iter__(self) -> SampleStream:
        return self

    def _next_sample(self, describe: bool = False) -> tuple[int, np.ndarray, dict | None]:
        while True:
            g, s, stream, index = self.cursor.advance()
            if g % self.dp_size == self.dp_rank:
                break
        if self.feed is not None:
            self.feed.at(g)  # the workers pace their read-ahead by it
        if stream < 0:
            sampler = self.samplers[s]
            origin = {"source": self.sources[s].name, **sampler.origin(index)} if describe else None
            return g, sampler.window(index), origin
        state = self.owned[(s, stream)]
        b = index // self.block
        if state.block is None or state.block.index != b:
            if self.feed is None:
                raise RuntimeError("raw source without a feed")
            state.block = self.feed.next_block((s, stream), b)
        window = state.block.windows[index % self.block]
        origin = None
        if describe:
            k, doc_id, offset = state.block.origins[index % self.block]
            file = self.plans[s].unit_at(stream, k).file
            if self.sources[s].fmt in BYTE_IDS:
                if s not in self._numbers:
                    self._numbers[s] = DocumentNumbers(self.sources[s])
                number, line = self._numbers[s](file, doc_id)
                document = {"document": number, "line": line, "document_byte_offset": doc_id}
            else:
                document = {"document": doc_id, "line": None, "document_byte_offset": None}
            origin = {"source": self.sources[s].name, "file": file, **document, "offset": offset, "stream": stream}
        return g, window, origin

    def __next__(self) -> dict[str, torch.Tensor]:
        indices, rows = [], []
        for _ in range(self.micro_batch):
            g, window, _ = self._next_sample()
            indices.append(g)
            rows.append(self.spec.make(window, g))
        self._to_boundary(indices[-1])
        return {
            "input_ids": torch.stack([r[0] for r in rows]),
            "labels": torch.stack([r[1] for r in rows]),
            "sample_index": torch.tensor(indices, dtype=torch.long),
        }

    def describe(self, count: int) -> list[dict]:
        """The next `count` samples of this rank with where they come from (for `trainer data`): source, file,
        document (text, jsonl: its number among the file's documents, from 0; parquet, datasets: its row), line (text,
        jsonl: the line it starts on, from 1; None for prepared shards, whose raw file is not read), document_byte_offset
        (text, jsonl), offset (of the sample's first token within the document, in tokens), stream or epoch, tokens."""
        out = []
        for _ in range(count):
            g, window, origin = self._next_sample(describe=True)
            out.append({"index": g, **origin, "tokens": window})
        return out

    def _to_boundary(self, last: int) -> None:
        """Advance the global cursor past the other ranks' samples of this micro-batch, to a position every rank
        shares (the next micro-batch starts at the same global index on every rank)."""
        boundary = last - self.dp_rank + self.dp_size
        while self.cursor.next_sample < boundary:
            self.cursor.advance()

    def consumed(self) -> dict[str, int]:
        """Samples each source has given the run so far (all ranks), at the last micro-batch boundary."""
        return dict(zip(self.cursor.mixture.names, self.cursor.mixture.counts))

    def state_dict(self) -> dict:
        """This rank's data position at a micro-batch boundary (JSON-safe). The global part is the same on every
        rank; each rank knows the cursors of its own streams only: merge_states() joins the ranks' states."""
        names = self.cursor.layout.names
        sources = dict(self.carried)
        for s, source in enumerate(self.sources):
            entry: dict = {"fingerprint": self.fingerprints[s]}
            if s in self.plans:
                streams = {}
                for stream, index in enumerate(self.cursor.counts[s]):
                    state = self.owned.get((s, stream))
                    streams[str(stream)] = {
                        "next": index,
                        "cursor": None if state is None else _cursor(state, index, self.block),
                    }
                entry["streams"] = streams
            sources[names[s]] = entry
        mixture = self.cursor.mixture.state_dict()
        mixture["counts"] = {**self.carried_counts, **mixture["counts"]}
        return {
            "version": STATE_VERSION,
            "next_sample": self.cursor.next_sample,
            **self.settings,
            "mixture": mixture,
            "sources": sources,
        }

    def start(self) -> None:
        """Start the tokenizing workers (if any) now rather than at the first batch: the first blocks are read while
        the caller builds and compiles the model."""
        if self.feed is not None:
            self.feed.start()

    def close(self) -> None:
        """Release worker processes, if any, and the files describe() numbers documents in."""
        if self.feed is not None:
            self.feed.close()
        for numbers in self._numbers.values():
            numbers.close()


def _cursor(state: StreamState, index: int, block: int) -> dict:
    """Cursor of the block holding the stream's next sample `index`."""
    b = index // block
    if state.block is None:
        return state.cursor
    if state.block.index == b:
        return {"block": b, **state.block.start}
    if state.block.index + 1 == b:
        return {"block": b, **state.block.end}
    raise RuntimeError(f"stream state at block {state.block.index}, next sample in block {b}")


def merge_states(states: list[dict]) -> dict:
    """One data position from every rank's state_dict(): the global part of the first, each stream's cursor from
    the rank that read it."""
    merged = {**states[0], "sources": {}}
    for name, entry in states[0]["sources"].items():
        entry = {**entry}
        if "streams" in entry:
            streams = {}
            for stream, value in entry["streams"].items():
                cursors = [st["sources"][name]["streams"][stream]["cursor"] for st in states]
                streams[stream] = {**value, "cursor": next((c for c in cursors if c is not None), None)}
            entry["streams"] = streams
        merged["sources"][name] = entry
    return merged


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name}={value!r} is invalid; use an integer >= {minimum}")
    return value


def build_stream(
    sources: list[Source] | list[str] | str | dict,
    *,
    tokenizer_path: str | os.PathLike,
    objective: str,
    seq_len: int,
    seed: int,
    dp_rank: int,
    dp_size: int,
    micro_batch: int,
    fmt: str = "auto",
    text_field: str = "text",
    shuffle: bool = True,
    streams: int = 64,
    block: int = 128,
    num_workers: int = 1,
    bad_lines: str = "skip",
    start_sample: int = 0,
    state: dict | None = None,
    holdout: tuple[float, bool] | None = None,
    warn: bool = True,
) -> SampleStream:
    """The micro-batch stream of data-parallel rank `dp_rank`.

    `sources`: Source objects, or paths / a `data.train` value (parsed with fmt and text_field). The stream starts at
    the saved position `state` (a merged state_dict(); checked against these settings), or else at global sample
    `start_sample` (reached by reading, not training, what comes before). `streams` (L) logical streams per raw source;
    with dp_size dividing L this rank reads only its own. `num_workers` DataLoader workers tokenize (0 = in this
    process). `holdout` = (fraction, keep): keep only the held-out documents (True) or all others (False).
    """
    _check_int("dp_size", dp_size, 1)
    _check_int("dp_rank", dp_rank, 0)
    if dp_rank >= dp_size:
        raise UserError(f"dp_rank={dp_rank} is not below dp_size={dp_size}; check the launch world size")
    _check_int("micro_batch", micro_batch, 1)
    _check_int("start_sample", start_sample, 0)
    if start_sample % dp_size:
        raise UserError(f"start_sample={start_sample} is not a multiple of dp_size={dp_size} (a micro-batch boundary)")
    _check_int("num_workers", num_workers, 0)
    _check_int("data.streams", streams, 1)
    _check_int("data.shuffle_block", block, 1)
    info = load_tokenizer(tokenizer_path)
    spec = SampleSpec.create(info, objective, seq_len, seed)
    if not (isinstance(sources, list) and sources and isinstance(sources[0], Source)):
        sources = parse_sources(sources, fmt, text_field)
    settings = {
        "arch": STORED_TAG[spec.objective],  # the key and tag saved positions have always had
        "seq_len": seq_len,
        "seed": seed,
        "shuffle": bool(shuffle),
        "streams": streams,
        "block": block,
    }

    samplers, plans = {}, {}
    for s, source in enumerate(sources):
        if source.raw:
            check_read_args(source.fmt, source.text_field, bad_lines)
            units = tuple(plan_units(source, streams))
            plans[s] = StreamPlan(source, units, streams, bool(shuffle), seed, fingerprint(source), holdout)
        else:
            if holdout is not None:
                raise UserError(
                    f"data.valid_fraction holds out documents of raw text; it cannot split the prepared shards of "
                    f"{source.label()}: give data.valid instead (`trainer prepare` writes it to OUT/valid)"
                )
            try:
                shards = TokenShards(source.paths[0], info, spec.objective)
            except UserError as exc:  # TokenShards names the directory; say which config key gave it
                raise UserError(f"{source.key}: {exc}" if source.key else str(exc)) from None
            samplers[s] = PreparedSampler(shards, spec, bool(shuffle), seed, shards.fingerprint)
    layout = Layout(
        tuple(s.name for s in sources), tuple(s.weight for s in sources), tuple(s.raw for s in sources), streams
    )
    fingerprints = {
        s: (samplers[s].fingerprint if s in samplers else plans[s].fingerprint) for s in range(len(sources))
    }
    position = _position(state, start_sample, layout, settings, fingerprints)

    # this rank's streams: those of its residue class when dp divides L, else all of them
    mine = [st for st in range(streams) if streams % dp_size or st % dp_size == dp_rank]
    if streams % dp_size and plans and warn and dp_rank == 0:
        print(
            f"warning: data.streams={streams} is not a multiple of the data-parallel size {dp_size}: every rank reads "
            "and tokenizes every stream; set data.streams to a multiple of it",
            file=sys.stderr,
            flush=True,
        )
    keys = [(s, st) for s in sorted(plans) for st in mine]
    owned = {key: StreamState(position["cursors"][key]) for key in keys}
    cursor = ScheduleCursor(layout, position["next_sample"], position["mixture"], position["counts"])
    feed = None
    if plans:
        needs = BlockNeeds(
            layout, position["next_sample"], position["mixture"], position["counts"], dp_rank, dp_size, block
        )
        reader_args = {
            "tokenizer_path": str(info.path),
            "stride": spec.stride,
            "span": spec.span,
            "block": block,
            "separator": spec.separator_id,
            "bad_lines": bad_lines,
        }
        cursors = {key: position["cursors"][key] for key in keys}
        feed = BlockSource(BlockFeed(plans, needs, reader_args, cursors, keys), num_workers)
    stream = SampleStream(
        sources=sources,
        samplers=samplers,
        plans=plans,
        spec=spec,
        cursor=cursor,
        feed=feed,
        owned=owned,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch=micro_batch,
        block=block,
        settings=settings,
        carried=position["carried"],
        carried_counts=position["carried_counts"],
        fingerprints=fingerprints,
    )
    if position["skip"]:
        _skip(stream, position["skip"], progress=warn)
    return stream


def _skip(stream: SampleStream, until: int, progress: bool = True) -> None:
    """Move a fresh stream to global sample `until` without making samples (the schedule runs through; raw
    streams read their blocks). Reading through takes time (raw sources tokenize everything before `until`): when it
    takes longer than SKIP_PROGRESS_S, a line on stderr says how far it is, every SKIP_PROGRESS_S."""
    started = time.monotonic()
    report_at = started + SKIP_PROGRESS_S
    while stream.cursor.next_sample < until:
        if stream.cursor.next_sample % stream.dp_size == stream.dp_rank:
            stream._next_sample()
        else:
            stream.cursor.advance()
        if progress and (now := time.monotonic()) >= report_at:
            report_at = now + SKIP_PROGRESS_S
            done = stream.cursor.next_sample
            rate = done / max(now - started, 1e-9)
            print(
                f"data: reaching sample {until:,} by reading through the samples before it: {done:,} of "
                f"{until:,} read ({100 * done / until:.1f}%), {rate:,.0f} samples/s, about "
                f"{_duration((until - done) / max(rate, 1e-9))} left; Ctrl-C stops",
                file=sys.stderr,
                flush=True,
            )


def _duration(seconds: float) -> str:
    """3 s, 4 min 5 s, 2 h 7 min, 3 d 4 h."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _position(state: dict | None, start_sample: int, layout: Layout, settings: dict, fingerprints: dict) -> dict:
    """The starting position: from a saved state (validated), or fresh (then `skip` samples are read through)."""
    raw = [s for s, r in enumerate(layout.raw) if r]
    fresh_cursors = {(s, st): dict(FRESH_CURSOR) for s in raw for st in range(layout.streams)}
    if state is None:
        return {
            "next_sample": 0,
            "mixture": None,
            "counts": {},
            "cursors": fresh_cursors,
            "carried": {},
            "carried_counts": {},
            "skip": start_sample,
        }
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UserError(
            "the checkpoint's data position was written by an earlier version of the data pipeline; resume is not "
            "exact across that change: start a new run (checkpoint.resume=never) or use the earlier version"
        )
    if start_sample not in (0, state["next_sample"]):
        raise UserError(f"saved data position is sample {state['next_sample']} but start_sample={start_sample}")
    for key, value in settings.items():
        if state.get(key) != value:
            if key == "arch":  # the objective, under its stored tag
                raise UserError(
                    f"the checkpoint's data position is of {FROM_TAG.get(state.get(key))} samples and this model family "
                    f"trains on {FROM_TAG[value]} ones: resume with a family of the same objective, or start a new run"
                )
            name = {"seed": "run.seed", "block": "data.shuffle_block"}.get(key, f"data.{key}")
            raise UserError(
                f"{name} was {state.get(key)!r} when the checkpoint was written and is {value!r} now; the data order "
                f"depends on it: set {name}={state.get(key)!r} to resume"
            )
    saved = state["sources"]
    counts, cursors = {}, dict(fresh_cursors)
    for s, name in enumerate(layout.names):
        if name not in saved:
            continue  # a source added at this resume starts at its beginning
        entry = saved[name]
        if entry["fingerprint"] != fingerprints[s]:
            raise UserError(
                f"data source {name!r} changed since the checkpoint (other files or sizes); the saved position no "
                "longer applies: restore the corpus, or give the changed corpus another source name"
            )
        if not layout.raw[s]:
            continue
        if "streams" not in entry:
            raise UserError(f"data source {name!r} was prepared shards at the checkpoint and is raw files now")
        counts[s] = [entry["streams"][str(st)]["next"] for st in range(layout.streams)]
        for st in range(layout.streams):
            cursor = entry["streams"][str(st)]["cursor"]
            if cursor is None:
                raise UserError(f"the checkpoint lacks stream {st} of source {name!r}; resume from an intact one")
            cursors[(s, st)] = cursor
    carried = {name: entry for name, entry in saved.items() if name not in layout.names}
    carried_counts = {n: c for n, c in state["mixture"]["counts"].items() if n not in layout.names}
    return {
        "next_sample": state["next_sample"],
        "mixture": state["mixture"],
        "counts": counts,
        "cursors": cursors,
        "carried": carried,
        "carried_counts": carried_counts,
        "skip": 0,
    }
