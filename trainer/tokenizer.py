"""Train and load tokenizers with Hugging Face `tokenizers`: byte-level BPE for GPT, WordPiece for BERT, and
character-level (every character of the corpus a token, plus <|endoftext|>) for small GPT experiments.

The saved tokenizer.json is the standard HF format, so exported models load with `transformers` unchanged.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from trainer.errors import UserError
from trainer.writable import check_writable_dir

EOS = "<|endoftext|>"
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
KINDS = ("bpe", "wordpiece", "char")
_MIN_VOCAB = {"bpe": 257, "wordpiece": 16}  # bpe: 256 byte symbols + <|endoftext|>; char: the corpus decides


@dataclass
class TokenizerInfo:
    """A loaded tokenizer plus the facts the data pipeline and models need (vocab size, special token ids)."""

    tokenizer: Tokenizer
    path: Path
    vocab_size: int
    kind: str  # "bpe", "wordpiece" or "other"
    eos_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    sha256: str = field(default="", repr=False)  # of the canonical JSON: identifies the tokenizer across copies

    @property
    def special_ids(self) -> set[int]:
        """Ids of all special tokens present (never masked or drawn as random MLM replacements)."""
        ids = {self.eos_id, self.cls_id, self.sep_id, self.mask_id, self.pad_id, self.unk_id}
        return {i for i in ids if i is not None}


def train_tokenizer(
    kind: str,
    vocab_size: int | None,
    files: list[str] | str,
    out_dir: str | os.PathLike,
    fmt: str = "auto",
    text_field: str = "text",
) -> Path:
    """Train a `kind` tokenizer ("bpe", "wordpiece" or "char") on text/jsonl/parquet files; write and return
    out_dir/tokenizer.json. `vocab_size` must be None for char: its vocabulary is the corpus's characters. The
    inputs and out_dir are checked before any training (they are the command's INPUT and --out arguments)."""
    # Imported here: trainer.data imports this module (load_tokenizer), so a top-level import would be circular.
    from trainer.data.documents import iter_documents
    from trainer.data.sources import Source, detect_format, resolve_files

    if kind not in KINDS:
        raise UserError(
            f"unknown tokenizer kind {kind!r}; use --kind bpe (GPT), --kind wordpiece (BERT) or --kind char (GPT, "
            "one token per character)"
        )
    if kind != "char" and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB[kind]
    ):
        raise UserError(
            f"vocab size {vocab_size!r} is invalid for {kind}; give --vocab-size N, an integer >= {_MIN_VOCAB[kind]} "
            "(or --kind char for a vocabulary of the corpus's characters)"
        )
    if kind == "char" and vocab_size is not None:
        raise UserError(
            f"--vocab-size {vocab_size} does not apply to --kind char: a char tokenizer's vocabulary is the corpus's "
            "characters (plus <|endoftext|> and [UNK]); drop --vocab-size, or use --kind bpe for a set size"
        )
    check_inputs(files)
    check_writable_dir(out_dir, "--out")
    paths = resolve_files(files)
    fmt = detect_format(paths, fmt)
    if fmt == "tokens":
        raise UserError(
            f"{', '.join(paths)} holds prepared token shards, not text; train the tokenizer on the raw "
            "text/jsonl/parquet files"
        )
    if fmt == "saved" and len(paths) != 1:
        raise UserError("train the tokenizer on one saved dataset directory at a time")
    source = Source("tokenizer", fmt, tuple(paths), text_field)
    if kind == "char":
        chars: set[str] = set()
        for _, _, doc in iter_documents(source):
            chars.update(doc)
        if not chars:  # documents are never empty
            raise UserError(f"no documents found in {', '.join(paths)}; check the files and their format/text field")
        return _save(char_tokenizer(chars), out_dir)

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=[PAD, UNK, CLS, SEP, MASK], show_progress=False
        )

    n_docs = 0

    def documents() -> Iterator[str]:
        nonlocal n_docs
        for _, _, doc in iter_documents(source):
            n_docs += 1
            yield doc

    tok.train_from_iterator(documents(), trainer=trainer)
    if n_docs == 0:
        raise UserError(f"no documents found in {', '.join(paths)}; check the files and their format/text field")
    if kind == "wordpiece":
        cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls_id), (SEP, sep_id)]
        )

    return _save(tok, out_dir)


def check_inputs(files: list[str] | str) -> None:
    """Each INPUT of `trainer tokenizer` exists (a path) or matches a file (a glob): refused naming the argument, not
    the config's data section (this corpus comes from the command line)."""
    for raw in [files] if isinstance(files, (str, os.PathLike)) else files:
        path = os.path.expanduser(str(raw))
        if glob.has_magic(path):
            if not glob.glob(path, recursive=True):
                raise UserError(f"tokenizer input {str(raw)!r} matches no files: fix the pattern (an INPUT argument)")
        elif not os.path.exists(path):
            raise UserError(f"tokenizer input {str(raw)!r} does not exist: fix the path (an INPUT argument)")


def char_tokenizer(chars: set[str]) -> Tokenizer:
    """One token per character of `chars` (sorted, after <|endoftext|> and [UNK]): a BPE model without merges, so text
    of these characters decodes to itself exactly; any other character encodes as [UNK]. Only <|endoftext|> is an added
    (special) token: "[UNK]" written in a text stays five characters."""
    vocab = {token: i for i, token in enumerate([EOS, UNK, *sorted(chars)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()  # the characters joined as they are (no spaces between tokens)
    tok.add_special_tokens([EOS])
    return tok


def _save(tok: Tokenizer, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tmp = out / f".tokenizer.json.tmp-{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written tokenizer.json
    return path


def load_tokenizer(path: str | os.PathLike) -> TokenizerInfo:
    """Load tokenizer.json (or a directory holding it) and collect its vocabulary size and special token ids."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(
            f"tokenizer file {str(p)!r} not found; train one with `trainer tokenizer` or fix data.tokenizer"
        )
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON or unknown parts
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load tokenizer {str(p)!r} ({first}); re-create it with `trainer tokenizer`") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if EOS in vocab:
        kind = "bpe"
    elif all(t in vocab for t in (CLS, SEP, MASK)):
        kind = "wordpiece"
    else:
        kind = "other"
    return TokenizerInfo(
        tokenizer=tok,
        path=p,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        kind=kind,
        eos_id=vocab.get(EOS),
        cls_id=vocab.get(CLS),
        sep_id=vocab.get(SEP),
        mask_id=vocab.get(MASK),
        pad_id=vocab.get(PAD),
        unk_id=vocab.get(UNK),
        sha256=hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest(),
    )
