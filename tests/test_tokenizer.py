"""Tokenizer training and loading on a slice of the demo corpus (real HF `tokenizers`, tiny vocabularies)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.errors import UserError
from trainer.tokenizer import load_tokenizer, train_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "train.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text(CORPUS.read_text()[:30000])
    return path


def test_bpe_train_load_roundtrip(corpus, tmp_path):
    path = train_tokenizer("bpe", 400, [str(corpus)], tmp_path / "bpe")
    assert path == tmp_path / "bpe" / "tokenizer.json" and path.is_file()
    info = load_tokenizer(tmp_path / "bpe")  # a directory holding tokenizer.json works too
    assert info.kind == "bpe" and info.vocab_size == 400
    assert info.eos_id is not None and info.tokenizer.id_to_token(info.eos_id) == "<|endoftext|>"
    assert info.cls_id is info.sep_id is info.mask_id is info.pad_id is None
    text = "First Citizen:\nWe are accounted poor citizens, the patricians good. Ünïcödé ✓"
    ids = info.tokenizer.encode(text, add_special_tokens=False).ids
    assert max(ids) < info.vocab_size
    assert info.tokenizer.decode(ids) == text  # byte-level: every string survives the round trip
    assert len(ids) < len(text.encode())  # merges were learned


def test_wordpiece_train_load(corpus, tmp_path):
    path = train_tokenizer("wordpiece", 500, str(corpus), tmp_path / "wp")
    info = load_tokenizer(path)
    assert info.kind == "wordpiece" and info.eos_id is None
    names = {"[PAD]": info.pad_id, "[UNK]": info.unk_id, "[CLS]": info.cls_id, "[SEP]": info.sep_id}
    names["[MASK]"] = info.mask_id
    for token, token_id in names.items():
        assert token_id is not None and info.tokenizer.id_to_token(token_id) == token
    assert info.special_ids == set(names.values())
    enc = info.tokenizer.encode("Before we proceed any further")
    assert enc.ids[0] == info.cls_id and enc.ids[-1] == info.sep_id  # the [CLS] $A [SEP] template
    plain = info.tokenizer.encode("Before we proceed", add_special_tokens=False).ids
    assert info.tokenizer.decode(plain) == "before we proceed"  # lowercased, ## pieces joined


def test_train_from_jsonl_and_parquet(corpus, tmp_path):
    paragraphs = [p for p in corpus.read_text().split("\n\n") if p.strip()]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": paragraphs}), parquet)
    for src in (jsonl, parquet):
        info = load_tokenizer(train_tokenizer("bpe", 300, [str(src)], tmp_path / src.suffix[1:], text_field="body"))
        assert info.kind == "bpe" and info.vocab_size == 300


@pytest.mark.parametrize(
    ("kind", "vocab", "match"),
    [("sentencepiece", 300, "unknown tokenizer kind"), ("bpe", 100, ">= 257"), ("wordpiece", "300", "invalid")],
)
def test_train_bad_arguments(corpus, tmp_path, kind, vocab, match):
    with pytest.raises(UserError, match=match):
        train_tokenizer(kind, vocab, [str(corpus)], tmp_path)


def test_train_missing_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer("bpe", 300, [str(tmp_path / "nope.txt")], tmp_path)
    with pytest.raises(UserError, match="matches no files"):
        train_tokenizer("bpe", 300, [str(tmp_path / "*.txt")], tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(UserError, match="no documents"):
        train_tokenizer("wordpiece", 300, [str(empty)], tmp_path / "out")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot load tokenizer") as err:
        load_tokenizer(bad)
    assert "\n" not in str(err.value)
