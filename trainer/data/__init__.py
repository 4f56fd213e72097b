"""Corpus sources, the data order (shuffle, mixture, logical streams), packing into samples, prepared shards."""

from trainer.data.sample_stream import SampleStream, build_stream, merge_states
from trainer.data.shards import TokenShards, prepare
from trainer.data.sources import Source, detect_format, parse_sources, resolve_files

__all__ = [
    "SampleStream",
    "Source",
    "TokenShards",
    "build_stream",
    "detect_format",
    "merge_states",
    "parse_sources",
    "prepare",
    "resolve_files",
]
