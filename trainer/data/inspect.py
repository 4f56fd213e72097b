"""`trainer data`: where global samples come from, one record per sample, without training anything."""

from __future__ import annotations

from collections.abc import Iterator

from trainer.config import Config
from trainer.errors import UserError
from trainer.tokenizer import load_tokenizer


def parse_range(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B) with 0 <= A < B."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--range {text!r} is not A:B (two integers, e.g. 0:64)") from None
    if not 0 <= a < b:
        raise UserError(f"--range {text!r} must have 0 <= A < B")
    return a, b


def describe_samples(cfg: Config, span: str, dp: int, n_tokens: int) -> Iterator[dict]:
    """Global samples A..B-1 of the training order: index, source, file, document, line, document_byte_offset, offset,
    the data-parallel rank that takes it at `dp`, and its first content tokens decoded (SampleStream.describe says what
    each field is). The order does not depend on dp, so one reader walks it; samples before A are read through (raw
    sources) or computed (prepared shards)."""
    from trainer.data.from_config import build_data_stream, data_sources  # the training run's own stream

    a, b = parse_range(span)
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise UserError(f"--dp {dp!r} must be a positive integer")
    sources, _ = data_sources(cfg)
    info = load_tokenizer(cfg.data.tokenizer)
    stream = build_data_stream(cfg, _OneRank(), sources, training=True, micro_batch=1, start_sample=a)
    try:
        for _ in range(b - a):
            (row,) = stream.describe(1)
            tokens = row.pop("tokens")
            fields = ("index", "source", "file", "document", "line", "document_byte_offset", "offset")
            head = {k: row.pop(k) for k in fields}
            text = info.tokenizer.decode(tokens[:n_tokens].tolist(), skip_special_tokens=False)
            yield {**head, "rank": head["index"] % dp, **row, "text": text}
    finally:
        stream.close()


class _OneRank:
    """The layout the order is read in: one data-parallel rank (the order does not depend on dp)."""

    dp_rank, dp = 0, 1
