"""Tokenizer training and loading on a slice of the demo corpus (real HF `tokenizers`, tiny vocabularies)."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_metrics, run_cli, tiny_config, write_config
from trainer.cli import main
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


def test_char_tokenizer_roundtrip(corpus, tmp_path):
    """--kind char: every character of the documents is a token, after <|endoftext|> (the GPT separator) and [UNK];
    text of seen characters (newlines and runs of spaces included) decodes to itself, one token per character."""
    path = train_tokenizer("char", None, [str(corpus)], tmp_path / "char")
    info = load_tokenizer(path)
    chars = set(corpus.read_text())  # the documents hold every character of the file
    assert info.vocab_size == len(chars) + 2 and info.tokenizer.id_to_token(info.eos_id) == "<|endoftext|>"
    assert info.special_ids == {info.eos_id, info.unk_id} and info.cls_id is info.mask_id is None
    text = "  First Citizen:\n\n\nWe are  accounted poor citizens;\nthe patricians good. \n"
    assert set(text) <= chars
    ids = info.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(text) and info.tokenizer.decode(ids) == text
    assert [info.tokenizer.id_to_token(i) for i in ids[:3]] == [" ", " ", "F"]
    eos = info.tokenizer.encode("a.<|endoftext|>b", add_special_tokens=False).ids
    assert eos[2] == info.eos_id and len(eos) == 4
    assert info.tokenizer.encode("a\u2713", add_special_tokens=False).ids[1] == info.unk_id  # never seen

    jsonl = tmp_path / "u.jsonl"  # non-ASCII characters, from the documents only (not the JSON around them)
    jsonl.write_text(json.dumps({"text": "Ünïcödé ✓ 𝄞\ttab"}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    info = load_tokenizer(train_tokenizer("char", None, [str(jsonl)], tmp_path / "u"))
    assert info.vocab_size == len(set("Ünïcödé ✓ 𝄞\ttabok")) + 2
    for text in ("𝄞 ✓\tÜnïcödé", "ok ok", "\t\t"):
        assert info.tokenizer.decode(info.tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_char_tokenizer_cli_and_training(corpus, tmp_path, capsys):
    """`trainer tokenizer --kind char` needs no --vocab-size (bpe still does); gpt-tiny trains on its output."""
    main(["tokenizer", "--kind", "char", "--out", str(tmp_path / "char"), str(corpus)])
    assert f"tokenizer written to {tmp_path / 'char' / 'tokenizer.json'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "--kind", "bpe", "--out", str(tmp_path / "bpe"), str(corpus)])
    assert exit_.value.code == 2 and "give --vocab-size N" in capsys.readouterr().err

    vocab = load_tokenizer(tmp_path / "char").vocab_size
    cfg = tiny_config(tmp_path / "run", corpus, tmp_path / "char" / "tokenizer.json", **{"train.steps": 3})
    cfg["model"] = {"arch": "gpt", "preset": "gpt-tiny", "dropout": 0.0}
    r = run_cli("trainer", "train", str(write_config(cfg, tmp_path / "c.yaml")), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m and "event" not in m]
    assert len(losses) == 3 and abs(losses[0] - math.log(vocab)) < 0.5, (losses, vocab)  # logits over the chars


def test_char_tokenizer_refuses_a_vocab_size(corpus, tmp_path, capsys):
    """A char tokenizer's vocabulary is the corpus's characters: --vocab-size is refused in one line, not ignored."""
    with pytest.raises(UserError, match="--vocab-size 10 does not apply to --kind char"):
        train_tokenizer("char", 10, [str(corpus)], tmp_path / "api")
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "--kind", "char", "--vocab-size", "10", "--out", str(tmp_path / "cli"), str(corpus)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "drop --vocab-size" in err[0], err
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()


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
    [
        ("sentencepiece", 300, "unknown tokenizer kind"),
        ("bpe", 100, ">= 257"),
        ("wordpiece", "300", "invalid"),
        ("bpe", None, "give --vocab-size N"),
    ],
)
def test_train_bad_arguments(corpus, tmp_path, kind, vocab, match):
    with pytest.raises(UserError, match=match):
        train_tokenizer(kind, vocab, [str(corpus)], tmp_path)


def test_train_missing_inputs(tmp_path):
    """A missing input is named as the command's INPUT argument (not as a path of the config's data section)."""
    with pytest.raises(UserError, match=r"tokenizer input '.*nope.txt' does not exist: fix the path \(an INPUT") as e:
        train_tokenizer("bpe", 300, [str(tmp_path / "nope.txt")], tmp_path)
    assert "data" not in str(e.value).replace(str(tmp_path), "")
    with pytest.raises(
        UserError, match=r"tokenizer input '.*\*.txt' matches no files: fix the pattern \(an INPUT"
    ) as e:
        train_tokenizer("bpe", 300, [str(tmp_path / "*.txt")], tmp_path)
    assert "data" not in str(e.value).replace(str(tmp_path), "")
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
