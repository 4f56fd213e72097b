"""Corpus reading, tokenization, packing into the global sample sequence, and prepared token shards."""

from trainer.data.shards import TokenShards, prepare
from trainer.data.sources import detect_format, resolve_files
from trainer.data.stream import SampleStream, build_stream

__all__ = ["SampleStream", "TokenShards", "build_stream", "detect_format", "prepare", "resolve_files"]
