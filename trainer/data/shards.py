"""Prepared token shards (version 2): one epoch of a source's content token stream, pre-tokenized.

A prepared directory holds, per input of the source (file, or the one saved/streamed dataset): `tokens_<k>.bin`
(the input's documents, each followed by the separator; numpy uint16, or uint32 for vocabularies of 65536 and
more) and `docs_<k>.npy` (int64, one row per document: its id in the input and its token start in tokens_<k>.bin),
plus meta.json, which lists the inputs in corpus order and is written last, atomically. Re-running prepare into the
directory tokenizes only new or changed inputs (same name and size: kept untouched). Files meta.json does not list
are leftovers of a crash or of replaced inputs, removed by the next prepare.

TokenShards reads any content position through np.memmap, so a rank reads sample i directly and maps a position
back to (input, document id, offset) with `locate`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from itertools import chain
from pathlib import Path

import numpy as np

from trainer.data.documents import check_read_args, iter_documents
from trainer.data.packing import FROM_TAG, STORED_TAG, objective_of, separator_id
from trainer.data.sources import Source
from trainer.errors import UserError
from trainer.tokenizer import TokenizerInfo, load_tokenizer

META_VERSION = 2
CHUNK_DOCS = 2048  # documents per encode call
CHUNK_CHARS = 4 << 20  # ... or fewer, once they hold this many characters
QUEUED_CHUNKS = 4  # chunks the reader thread may read ahead
PROGRESS_EVERY = 10.0  # seconds between progress lines on stderr
_OWN_FILE = re.compile(r"(tokens_\d+\.bin|docs_\d+\.npy|\.meta\.json\.tmp-.*)")  # what prepare writes besides meta


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def read_meta(directory: str | os.PathLike) -> dict | None:
    """meta.json of a prepared directory, or None when there is none; UserError when it is unreadable."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); re-run `trainer prepare` into a new directory") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a prepared-shards meta file; re-run `trainer prepare` into a new directory")
    return meta


def corpus_fingerprint(arch: str, tokenizer_sha256: str, inputs: list[dict]) -> str:
    """A short hash of what defines the prepared token stream, so training notices when the corpus changed."""
    key = [META_VERSION, arch, tokenizer_sha256, [[i["name"], i["size"], i["n_tokens"]] for i in inputs]]
    return hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()


# ---- prepare -----------------------------------------------------------------------------------------------------


def prepare(
    source: Source,
    tokenizer_path: str | os.PathLike,
    objective: str,
    out_dir: str | os.PathLike,
    *,
    bad_lines: str = "skip",
) -> dict:
    """Tokenize one epoch of a raw source (every document + separator) into `out_dir`; return its meta.

    Inputs already prepared in `out_dir` with the same arch, tokenizer, reader settings, name and size are kept as
    they are; only new or changed inputs are read.
    """
    if not source.raw:
        raise UserError(
            f"{source.label()} is already prepared token shards; "
            "give `trainer prepare` the raw text/jsonl/parquet files or dataset"
        )
    check_read_args(source.fmt, source.text_field, bad_lines)
    info = load_tokenizer(tokenizer_path)
    sep = separator_id(info, objective)
    arch = STORED_TAG[objective_of(objective)]  # meta.json's key and tag for the objective, as always written
    out = Path(out_dir)
    old = _check_out_dir(out, arch, info)
    reader = {"format": source.fmt, "text_field": source.text_field}
    if source.fmt == "dataset":
        reader.update(dataset=source.dataset, subset=source.subset, split=source.split)
    reusable = {}
    if old is not None and old.get("version") == META_VERSION and old.get("reader") == reader:
        reusable = {i["name"]: i for i in old["inputs"]}

    paths, names, sizes = _inputs(source)
    entries: list[dict | None] = []
    todo = []  # indices of inputs to tokenize
    for k, (name, size) in enumerate(zip(names, sizes)):
        done = reusable.get(name)
        if done is not None and done["size"] == size and _files_intact(out, done, _dtype_for(info.vocab_size)):
            entries.append(done)
        else:
            entries.append(None)
            todo.append(k)

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        if todo:
            part = (
                source if len(todo) == len(paths) else dataclasses.replace(source, paths=tuple(paths[k] for k in todo))
            )
            picked = [(paths[k], names[k], sizes[k]) for k in todo]
            for k, entry in zip(todo, _tokenize(part, picked, info, sep, out, bad_lines, written)):
                entries[k] = entry
        inputs = [e for e in entries if e is not None]
        n_content = sum(e["n_tokens"] - e["n_docs"] for e in inputs)
        if n_content == 0:
            raise UserError(f"{source.label()} has no tokens; check the files and text field")
        meta = {
            "version": META_VERSION,
            "dtype": _dtype_for(info.vocab_size).name,
            "arch": arch,
            "tokenizer_sha256": info.sha256,
            "vocab_size": info.vocab_size,
            "fingerprint": corpus_fingerprint(arch, info.sha256, inputs),
            "n_tokens": sum(e["n_tokens"] for e in inputs),
            "n_docs": sum(e["n_docs"] for e in inputs),
            "reader": reader,
            "inputs": inputs,
        }
        _write_meta(out, meta)
    except BaseException:
        for path in written:  # this run's files: no meta references them
            path.unlink(missing_ok=True)
        raise
    referenced = {name for e in inputs for name in (e["tokens"], e["docs"])}
    for path in out.iterdir():
        if _OWN_FILE.fullmatch(path.name) and path.name not in referenced:
            path.unlink(missing_ok=True)
    return meta


def _check_out_dir(out: Path, arch: str, info: TokenizerInfo) -> dict | None:
    """The meta of an existing prepared `out` (None when out is new, empty or holds only a crashed run's files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {str(out)!r} is a file; choose another --out directory")
    if not out.exists():
        return None
    meta = read_meta(out)
    if meta is None:
        strangers = [p.name for p in out.iterdir() if not _OWN_FILE.fullmatch(p.name)]
        if strangers:
            raise UserError(
                f"output {str(out)!r} is not empty and not a prepared directory (it holds {strangers[0]!r}); "
                "choose another --out directory"
            )
        return None
    if meta.get("version") not in (1, META_VERSION):
        raise UserError(f"{out} holds prepared shards of unknown version {meta.get('version')!r}; choose another --out")
    if meta.get("arch") != arch or meta.get("tokenizer_sha256") != info.sha256:
        other = f"{FROM_TAG.get(meta.get('arch'))} samples" if meta.get("arch") != arch else "another tokenizer"
        raise UserError(f"{out} holds shards prepared with {other}; choose another --out directory for {info.path}")
    return meta


def _inputs(source: Source) -> tuple[list[str], list[str], list[int]]:
    """Paths, unique names and sizes in bytes of the source's inputs, in corpus order."""
    if source.fmt == "dataset":
        return [source.dataset], [os.path.basename(source.dataset.rstrip("/")) or source.dataset], [0]
    paths = list(source.paths)
    if source.fmt == "saved":
        size = sum(p.stat().st_size for p in Path(paths[0]).rglob("*") if p.is_file())
        return paths, [os.path.basename(os.path.normpath(paths[0]))], [size]
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):  # same file name in several folders: name them by path below the common folder
        root = os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in paths])
        names = [os.path.relpath(os.path.abspath(p), root) for p in paths]
    return paths, names, [os.path.getsize(p) for p in paths]


def _files_intact(out: Path, entry: dict, dtype: np.dtype) -> bool:
    tokens, docs = out / entry["tokens"], out / entry["docs"]
    return tokens.is_file() and tokens.stat().st_size == entry["n_tokens"] * dtype.itemsize and docs.is_file()


def _read_chunks(source: Source, bad_lines: str, chunks: queue.Queue, stop: threading.Event) -> None:
    """Reader thread: (file, doc ids, texts) chunks of one file each; then None, or the exception that ended it."""

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        file, ids, texts, chars = None, [], [], 0
        for doc_file, doc_id, text in iter_documents(source, bad_lines):
            if texts and (doc_file != file or len(texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS):
                if not put((file, ids, texts)):
                    return
                ids, texts, chars = [], [], 0
            file = doc_file
            ids.append(doc_id)
            texts.append(text)
            chars += len(text)
        if texts and not put((file, ids, texts)):
            return
        put(None)
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
        put(exc)


def _chunks(source: Source, bad_lines: str) -> Iterator[tuple[str, list[int], list[str]]]:
    """Document chunks read ahead by a thread, so reading overlaps encoding (which releases the GIL)."""
    chunks: queue.Queue = queue.Queue(maxsize=QUEUED_CHUNKS)
    stop = threading.Event()
    thread = threading.Thread(target=_read_chunks, args=(source, bad_lines, chunks, stop), daemon=True)
    thread.start()
    try:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _InputWriter:
    """Appends one input's token stream to tokens_<k>.bin and collects its document index for docs_<k>.npy."""

    def __init__(self, out: Path, k: int, name: str, size: int, dtype: np.dtype, written: list[Path]) -> None:
        self.entry = {"name": name, "size": size, "tokens": f"tokens_{k:05d}.bin", "docs": f"docs_{k:05d}.npy"}
        self.out, self.dtype = out, dtype
        self.path = out / self.entry["tokens"]
        written += [self.path, out / self.entry["docs"]]
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in finish()
        self.n_tokens = 0
        self.index: list[np.ndarray] = []

    def write(self, doc_ids: list[int], tokens: np.ndarray, starts: np.ndarray) -> None:
        self.index.append(np.stack([np.asarray(doc_ids, dtype=np.int64), starts + self.n_tokens], axis=1))
        tokens.astype(self.dtype, copy=False).tofile(self.file)
        self.n_tokens += len(tokens)

    def finish(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        index = np.concatenate(self.index) if self.index else np.empty((0, 2), dtype=np.int64)
        with open(self.out / self.entry["docs"], "wb") as f:
            np.save(f, index)
            f.flush()
            os.fsync(f.fileno())
        return {**self.entry, "n_tokens": self.n_tokens, "n_docs": len(index)}


def _tokenize(
    source: Source,
    inputs: list[tuple[str, str, int]],
    info: TokenizerInfo,
    sep: int,
    out: Path,
    bad_lines: str,
    written: list[Path],
) -> list[dict]:
    """Tokenize the source's `inputs` (path, name, size) into fresh files; their meta entries, in order."""
    dtype = _dtype_for(info.vocab_size)
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"(?:tokens|docs)_(\d+)\.\w+", p.name))]
    first = max(taken, default=-1) + 1  # fresh names: never overwrite a file an existing meta may reference
    encode = getattr(info.tokenizer, "encode_batch_fast", info.tokenizer.encode_batch)
    index = {p: i for i, (p, _, _) in enumerate(inputs)} if source.fmt not in ("saved", "dataset") else None
    entries: list[dict | None] = [None] * len(inputs)

    def new_writer(i: int) -> _InputWriter:
        return _InputWriter(out, first + i, inputs[i][1], inputs[i][2], dtype, written)

    writer: _InputWriter | None = None
    current = -1
    progress = _Progress(source.name)

    def store(file: str, doc_ids: list[int], encoded: Future) -> None:
        nonlocal writer, current
        i = 0 if index is None else index[file]
        if i != current:
            if writer is not None:
                entries[current] = writer.finish()
            for j in range(current + 1, i):  # inputs without documents
                entries[j] = new_writer(j).finish()
            writer, current = new_writer(i), i
        tokens, starts = _flatten(encoded.result(), sep)
        writer.write(doc_ids, tokens, starts)
        progress.add(len(doc_ids), len(tokens))

    try:
        # the tokenizer encodes chunk i + 1 (in Rust, all cores, without the GIL) while chunk i is stored
        with closing(_chunks(source, bad_lines)) as chunks, ThreadPoolExecutor(1) as pool:
            pending = None
            for file, doc_ids, texts in chunks:
                encoded = pool.submit(encode, texts, add_special_tokens=False)
                if pending is not None:
                    store(*pending)
                pending = (file, doc_ids, encoded)
            if pending is not None:
                store(*pending)
        if writer is not None:
            entries[current] = writer.finish()
        for j in range(current + 1, len(inputs)):
            entries[j] = new_writer(j).finish()
    finally:
        if writer is not None and not writer.file.closed:
            writer.file.close()
    return entries  # type: ignore[return-value]


def _flatten(encodings: list, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's token stream (each document's tokens, then `sep`) and each document's start in it."""
    ids = [enc.ids for enc in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    return np.insert(flat, ends, sep), ends - lengths + np.arange(len(ids))


class _Progress:
    """A line on stderr every PROGRESS_EVERY seconds of a long prepare: documents, tokens and tokens/s so far."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.docs = self.tokens = 0
        self.start = self.last = time.monotonic()

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            rate = self.tokens / (now - self.start)
            print(
                f"prepare {self.name}: {self.docs:,} documents, {self.tokens:,} tokens, {rate:,.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )


def _write_meta(out: Path, meta: dict) -> None:
    """Write meta.json atomically and durably: a crash leaves the old meta or the new one, never a torn one."""
    tmp = out / f".meta.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "meta.json")
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading -----------------------------------------------------------------------------------------------------


class TokenShards:
    """Random-access reader of a prepared directory: content windows at any position, wrapping around epochs, and
    the (input, document id, offset) of any position."""

    def __init__(self, directory: str | os.PathLike, info: TokenizerInfo, objective: str) -> None:
        self.directory = Path(directory)
        objective = objective_of(objective)
        meta = read_meta(self.directory)
        if meta is None:
            raise UserError(f"{self.directory} has no meta.json; run `trainer prepare` to make prepared shards")
        if meta.get("version") != META_VERSION:
            raise UserError(
                f"{self.directory} holds prepared shards of version {meta.get('version', 1)!r}, this trainer reads "
                f"version {META_VERSION}; re-run `trainer prepare`"
            )
        if meta.get("arch") != STORED_TAG[objective]:
            raise UserError(
                f"{self.directory} was prepared for {FROM_TAG.get(meta.get('arch'))} samples, not {objective} ones (a "
                f"model family of the other objective); re-run `trainer prepare` with this config"
            )
        if meta.get("tokenizer_sha256") != info.sha256:
            raise UserError(
                f"{self.directory} was prepared with another tokenizer than {info.path}; re-run `trainer prepare`"
            )
        self.meta = meta
        self.fingerprint: str = meta["fingerprint"]
        dtype = np.dtype(meta["dtype"])
        self._inputs: list[dict] = []  # the inputs holding tokens, with their memmaps
        self._maps: list[np.memmap] = []
        for entry in meta["inputs"]:
            path, docs = self.directory / entry["tokens"], self.directory / entry["docs"]
            if not path.is_file() or path.stat().st_size != entry["n_tokens"] * dtype.itemsize or not docs.is_file():
                raise UserError(f"{path} or {docs.name} is missing or has the wrong size; re-run `trainer prepare`")
            if entry["n_tokens"]:
                self._inputs.append(entry)
                self._maps.append(np.memmap(path, dtype=dtype, mode="r"))
        self._starts = np.cumsum([0] + [e["n_tokens"] for e in self._inputs])
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens == 0:
            raise UserError(f"{self.directory} holds no tokens; re-run `trainer prepare` on a non-empty corpus")
        self._docs: dict[int, np.ndarray] = {}

    def window(self, start: int, length: int) -> np.ndarray:
        """Content tokens [start, start + length) of the corpus repeated forever."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        pos = start % self.n_tokens
        while filled < length:
            k = int(np.searchsorted(self._starts, pos, side="right")) - 1
            offset = pos - int(self._starts[k])
            n = min(length - filled, len(self._maps[k]) - offset)
            out[filled : filled + n] = self._maps[k][offset : offset + n]
            filled += n
            pos = (pos + n) % self.n_tokens
        return out

    def locate(self, pos: int) -> tuple[str, int, int]:
        """(input name, document id, token offset within that document) of content position `pos` (modulo the
        corpus length); a document's separator is its last token."""
        name, _, doc_id, offset = self.locate_document(pos)
        return name, doc_id, offset

    def locate_document(self, pos: int) -> tuple[str, int, int, int]:
        """(input name, the document's number in that input from 0, its id, token offset within it) of content
        position `pos`, as locate()."""
        pos %= self.n_tokens
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1
        offset = pos - int(self._starts[k])
        docs = self._doc_index(k)
        j = bisect.bisect_right(docs[:, 1], offset) - 1  # O(log n) reads of the memmapped index
        return self._inputs[k]["name"], j, int(docs[j, 0]), offset - int(docs[j, 1])

    def _doc_index(self, k: int) -> np.ndarray:
        if k not in self._docs:
            entry = self._inputs[k]
            path = self.directory / entry["docs"]
            try:
                docs = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read {path} ({exc}); re-run `trainer prepare`") from None
            if docs.shape != (entry["n_docs"], 2) or (len(docs) and docs[0, 1] != 0):
                raise UserError(f"{path} does not match meta.json; re-run `trainer prepare`")
            self._docs[k] = docs
        return self._docs[k]
