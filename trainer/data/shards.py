"""Prepared token shards: one epoch of the content token stream, pre-tokenized into flat binary files.

Layout of a prepared directory: tokens_00000.bin, tokens_00001.bin, ... (numpy uint16, or uint32 for vocabularies of
65536 and more) and meta.json. Any content position is random access through np.memmap, so any rank reads sample i
directly: this is the path for corpora too large to re-read on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
from itertools import islice
from pathlib import Path

import numpy as np

from trainer.data.packing import separator_id
from trainer.data.sources import check_read_args, detect_format, iter_documents, resolve_files
from trainer.errors import UserError
from trainer.tokenizer import TokenizerInfo, load_tokenizer

META_VERSION = 1
ENCODE_CHUNK = 1024  # documents per encode_batch call


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def prepare(
    files: list[str] | str,
    fmt: str,
    text_field: str,
    tokenizer_path: str | os.PathLike,
    arch: str,
    out_dir: str | os.PathLike,
    bad_lines: str = "skip",
    shard_tokens: int = 2**26,
) -> dict:
    """Tokenize one epoch of the corpus (documents + separators) into token shards under `out_dir`; return meta.

    Written into a temporary sibling directory and renamed at the end, so a crash never leaves a half-made dir.
    """
    info = load_tokenizer(tokenizer_path)
    sep = separator_id(info, arch)
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens!r} is invalid; use a positive integer such as 67108864")
    paths = resolve_files(files)
    fmt = detect_format(paths, fmt)
    if fmt == "tokens":
        raise UserError("the inputs are already prepared token shards; pass the raw text/jsonl/parquet files")
    check_read_args(fmt, text_field, bad_lines)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {str(out)!r} already exists; remove it or choose another --out directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write_shards(paths, fmt, text_field, bad_lines, info, arch, sep, tmp, shard_tokens)
        if out.exists():
            out.rmdir()  # an empty directory, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class _ShardWriter:
    """Appends tokens to tokens_00000.bin, tokens_00001.bin, ... of at most shard_tokens each; memory stays flat."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._n = 0  # tokens in the open shard

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._file = open(self.out / f"tokens_{len(self.shards):05d}.bin", "wb")  # noqa: SIM115 - closed below
                self._n = 0
            part, tokens = tokens[: self.shard_tokens - self._n], tokens[self.shard_tokens - self._n :]
            part.astype(self.dtype).tofile(self._file)
            self._n += len(part)
            if self._n == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards.append({"file": Path(self._file.name).name, "n_tokens": self._n})
            self._file = None


def _write_shards(
    paths: list[str],
    fmt: str,
    text_field: str,
    bad_lines: str,
    info: TokenizerInfo,
    arch: str,
    sep: int,
    out: Path,
    shard_tokens: int,
) -> dict:
    dtype = _dtype_for(info.vocab_size)
    writer = _ShardWriter(out, dtype, shard_tokens)
    n_docs = n_content = 0
    docs = iter_documents(paths, fmt, text_field, bad_lines)
    try:
        while chunk := list(islice(docs, ENCODE_CHUNK)):
            encoded = [enc.ids + [sep] for enc in info.tokenizer.encode_batch(chunk, add_special_tokens=False)]
            n_docs += len(encoded)
            n_content += sum(len(ids) - 1 for ids in encoded)
            writer.write(np.fromiter((t for ids in encoded for t in ids), dtype=np.int64))
    finally:
        writer.close()
    if n_docs == 0 or n_content == 0:
        raise UserError(f"the corpus {', '.join(paths)} has no tokens; check the files and the text field")
    shards = writer.shards
    meta = {
        "version": META_VERSION,
        "dtype": dtype.name,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "shards": shards,
        "n_docs": n_docs,
        "arch": arch,
        "tokenizer_sha256": info.sha256,
        "vocab_size": info.vocab_size,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenShards:
    """Random-access reader of a prepared directory: content windows at any position, wrapping around epochs."""

    def __init__(self, directory: str | os.PathLike, info: TokenizerInfo, arch: str) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {meta_path} ({exc}); re-run `trainer prepare`") from None
        if meta.get("version") != META_VERSION:
            raise UserError(f"{meta_path} has version {meta.get('version')!r}, expected {META_VERSION}; re-run prepare")
        if meta.get("arch") != arch:
            raise UserError(
                f"{self.directory} was prepared for arch {meta.get('arch')!r}, not {arch!r}; re-run prepare"
            )
        if meta.get("tokenizer_sha256") != info.sha256:
            raise UserError(
                f"{self.directory} was prepared with another tokenizer than {info.path}; re-run `trainer prepare`"
            )
        self.meta = meta
        dtype = np.dtype(meta["dtype"])
        self._maps: list[np.memmap] = []
        for shard in meta["shards"]:
            path = self.directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["n_tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} is missing or has the wrong size; re-run `trainer prepare`")
            self._maps.append(np.memmap(path, dtype=dtype, mode="r"))
        self._starts = np.cumsum([0] + [s["n_tokens"] for s in meta["shards"]])
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens == 0:
            raise UserError(f"{self.directory} holds no tokens; re-run `trainer prepare` on a non-empty corpus")

    def window(self, start: int, length: int) -> np.ndarray:
        """Content tokens [start, start + length) of the corpus repeated forever."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        pos = start % self.n_tokens
        while filled < length:
            shard = int(np.searchsorted(self._starts, pos, side="right")) - 1
            offset = pos - int(self._starts[shard])
            n = min(length - filled, len(self._maps[shard]) - offset)
            out[filled : filled + n] = self._maps[shard][offset : offset + n]
            filled += n
            pos = (pos + n) % self.n_tokens
        return out

    def locate(self, pos: int) -> dict:
        """Resume offsets: none needed, since any position is random access."""
        return {}
