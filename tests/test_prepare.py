"""`trainer prepare` and TokenShards (version 2): content, windows, locate, incremental re-runs, refusals, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_cli, tiny_config, write_config
from trainer.cli import main
from trainer.data.documents import iter_documents
from trainer.data.packing import separator_id
from trainer.data.shards import TokenShards, prepare
from trainer.data.sources import Source, parse_sources
from trainer.errors import UserError
from trainer.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def paragraphs(corpus) -> list[str]:
    return [p.strip() for p in corpus.read_text().split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def info(gpt_tok):
    return load_tokenizer(gpt_tok)


def write_inputs(directory: Path, fmt: str, groups: list[list[str]]) -> list[str]:
    """One file per group of documents, in `fmt`, with things the readers skip (blank runs, bad lines, null rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, docs in enumerate(groups):
        path = directory / f"part{i}.{ {'text': 'txt'}.get(fmt, fmt) }"
        if fmt == "text":
            path.write_text("\n\n\n".join(docs) + "\n")
        elif fmt == "jsonl":
            lines = [json.dumps({"text": d}) for d in docs]
            lines.insert(1, "{not json")
            path.write_text("\n".join(lines) + "\n")
        else:
            rows = [d for doc in docs for d in (doc, None)]  # null rows are skipped: ids are rows, not positions
            pq.write_table(pa.table({"text": rows}), path, row_group_size=3)
        paths.append(str(path))
    return paths


def expected(source: Source, info, arch: str = "gpt") -> tuple[np.ndarray, list[tuple[str, int, int, int]]]:
    """The content stream tokenized one document at a time, and (input, doc id, start, length) of each document."""
    sep = separator_id(info, arch)
    tokens, docs = [], []
    for file, doc_id, text in iter_documents(source, warn=False):
        ids = info.tokenizer.encode(text, add_special_tokens=False).ids + [sep]
        docs.append((os.path.basename(file), doc_id, len(tokens), len(ids)))
        tokens += ids
    return np.array(tokens, dtype=np.int64), docs


def source_of(paths: list[str], fmt: str) -> Source:
    return Source("train", fmt, tuple(sorted(paths)))


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_content_and_locate(fmt, tmp_path, paragraphs, gpt_tok, info):
    paths = write_inputs(tmp_path / "raw", fmt, [paragraphs[0:9], paragraphs[9:12], paragraphs[12:25]])
    source = source_of(paths, fmt)
    meta = prepare(source, gpt_tok, "gpt", tmp_path / "out")
    want, docs = expected(source, info)
    assert len(docs) == 25

    shards = TokenShards(tmp_path / "out", info, "gpt")
    assert shards.n_tokens == meta["n_tokens"] == len(want)
    assert meta["n_docs"] == 25 and meta["version"] == 2 and meta["dtype"] == "uint16"
    assert [i["name"] for i in meta["inputs"]] == [os.path.basename(p) for p in sorted(paths)]
    assert [i["n_docs"] for i in meta["inputs"]] == [9, 3, 13]
    assert [i["size"] for i in meta["inputs"]] == [os.path.getsize(p) for p in sorted(paths)]
    np.testing.assert_array_equal(shards.window(0, len(want)), want)

    for name, doc_id, start, length in docs:
        for offset in (0, length // 2, length - 1):  # the separator is the document's last token
            assert shards.locate(start + offset) == (name, doc_id, offset)
        assert shards.locate(start + 3 * len(want)) == (name, doc_id, 0)
    if fmt == "parquet":
        assert [d[1] for d in docs[:4]] == [0, 2, 4, 6]  # rows, past the null rows, across row groups


def test_saved_dataset(tmp_path, paragraphs, gpt_tok, info):
    """A save_to_disk dataset is one input; document ids are rows."""
    datasets.Dataset.from_dict({"text": [paragraphs[0], "  ", paragraphs[1], paragraphs[2]]}).save_to_disk(
        tmp_path / "saved"
    )
    source = Source("train", "saved", (str(tmp_path / "saved"),))
    meta = prepare(source, gpt_tok, "gpt", tmp_path / "out")
    assert [(i["name"], i["n_docs"]) for i in meta["inputs"]] == [("saved", 3)] and meta["inputs"][0]["size"] > 0
    shards = TokenShards(tmp_path / "out", info, "gpt")
    want, docs = expected(source, info)
    np.testing.assert_array_equal(shards.window(0, shards.n_tokens), want)
    assert [shards.locate(start + 1) for _, _, start, _ in docs] == [("saved", row, 1) for row in (0, 2, 3)]


def test_window_wraps_around(tmp_path, paragraphs, gpt_tok, info):
    paths = write_inputs(tmp_path / "raw", "text", [paragraphs[:3], paragraphs[3:5]])
    prepare(source_of(paths, "text"), gpt_tok, "gpt", tmp_path / "out")
    shards = TokenShards(tmp_path / "out", info, "gpt")
    n = shards.n_tokens
    epoch = shards.window(0, n)
    np.testing.assert_array_equal(shards.window(n - 3, 10), np.concatenate([epoch[-3:], epoch[:7]]))
    np.testing.assert_array_equal(shards.window(5 + 2 * n, 4), epoch[5:9])
    np.testing.assert_array_equal(shards.window(7, 2 * n + 1), np.concatenate([epoch[7:], epoch, epoch[:8]]))
    assert shards.window(0, 4).dtype == np.int64


def test_incremental_rerun(tmp_path, paragraphs, gpt_tok, info):
    raw, out = tmp_path / "raw", tmp_path / "out"
    b, c = write_inputs(raw, "jsonl", [paragraphs[:4], paragraphs[4:9]])[:2]
    first = prepare(source_of([b, c], "jsonl"), gpt_tok, "gpt", out)
    stats = {i["name"]: os.stat(out / i["tokens"]) for i in first["inputs"]}
    (out / "tokens_00077.bin").write_bytes(b"left by a crash")

    a = str(raw / "a.jsonl")  # sorts first
    Path(a).write_text(json.dumps({"text": paragraphs[20]}) + "\n")
    source = source_of([a, b, c], "jsonl")
    second = prepare(source, gpt_tok, "gpt", out)
    assert [i["name"] for i in second["inputs"]] == ["a.jsonl", "part0.jsonl", "part1.jsonl"]
    assert second["inputs"][1:] == first["inputs"]
    for entry in second["inputs"][1:]:  # kept: neither re-read nor rewritten
        st = os.stat(out / entry["tokens"])
        assert (st.st_ino, st.st_mtime_ns) == (stats[entry["name"]].st_ino, stats[entry["name"]].st_mtime_ns)
    assert second["inputs"][0]["tokens"] not in {i["tokens"] for i in first["inputs"]}
    assert second["fingerprint"] != first["fingerprint"]
    assert not (out / "tokens_00077.bin").exists()
    shards = TokenShards(out, info, "gpt")
    want, docs = expected(source, info)
    np.testing.assert_array_equal(shards.window(0, shards.n_tokens), want)
    assert shards.locate(docs[-1][2]) == ("part1.jsonl", docs[-1][1], 0)

    with open(b, "a") as f:  # a changed input (other size) is tokenized again, into a new file
        f.write(json.dumps({"text": paragraphs[30]}) + "\n")
    third = prepare(source, gpt_tok, "gpt", out)
    assert third["inputs"][0] == second["inputs"][0] and third["inputs"][2] == second["inputs"][2]
    assert third["inputs"][1]["tokens"] != second["inputs"][1]["tokens"]
    assert third["inputs"][1]["n_docs"] == 5
    assert not (out / second["inputs"][1]["tokens"]).exists()

    fourth = prepare(source_of([a, c], "jsonl"), gpt_tok, "gpt", out)  # a removed input is dropped
    assert [i["name"] for i in fourth["inputs"]] == ["a.jsonl", "part1.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json"] + [f for i in fourth["inputs"] for f in (i["tokens"], i["docs"])]
    )
    shards = TokenShards(out, info, "gpt")
    np.testing.assert_array_equal(shards.window(0, shards.n_tokens), expected(source_of([a, c], "jsonl"), info)[0])
    assert shards.fingerprint == fourth["fingerprint"] != third["fingerprint"]


def test_refusals(tmp_path, corpus, paragraphs, gpt_tok, bert_tok, info):
    paths = write_inputs(tmp_path / "raw", "text", [paragraphs[:5]])
    source = source_of(paths, "text")
    out = tmp_path / "out"
    prepare(source, gpt_tok, "gpt", out)

    other = train_tokenizer("bpe", 300, [str(corpus)], tmp_path / "other")
    with pytest.raises(UserError, match="another tokenizer"):
        TokenShards(out, load_tokenizer(other), "gpt")
    with pytest.raises(UserError, match="choose another --out"):
        prepare(source, other, "gpt", out)
    with pytest.raises(UserError, match="choose another --out"):
        prepare(source, bert_tok, "bert", out)
    with pytest.raises(UserError, match="prepared for causal samples, not masked ones"):
        TokenShards(out, info, "bert")

    meta = json.loads((out / "meta.json").read_text())
    (out / meta["inputs"][0]["tokens"]).write_bytes(b"\0\0")
    with pytest.raises(UserError, match="missing or has the wrong size"):
        TokenShards(out, info, "gpt")

    for old in ({"shards": []}, {"version": 1, "shards": []}):  # version-1 layouts (or none) must be re-prepared
        (out / "meta.json").write_text(json.dumps({**old, "arch": "gpt", "tokenizer_sha256": info.sha256}))
        with pytest.raises(UserError, match="re-run `trainer prepare`"):
            TokenShards(out, info, "gpt")

    prepare(source, gpt_tok, "gpt", out)  # a version-1 directory of the same arch and tokenizer is re-prepared
    assert TokenShards(out, info, "gpt").meta["n_docs"] == 5

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not a prepared directory"):
        prepare(source, gpt_tok, "gpt", stranger)
    with pytest.raises(UserError, match="already prepared token shards"):
        prepare(Source("train", "tokens", (str(out),)), gpt_tok, "gpt", tmp_path / "again")

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    with pytest.raises(UserError, match="has no tokens"):
        prepare(source_of([str(empty)], "text"), gpt_tok, "gpt", tmp_path / "none")
    assert list((tmp_path / "none").iterdir()) == []


def test_reader_error_leaves_nothing(tmp_path, paragraphs, gpt_tok):
    """An error in the reader thread reaches the caller; the run's files are removed, the old meta stays."""
    out = tmp_path / "out"
    bad = tmp_path / "z.jsonl"
    bad.write_text(json.dumps({"text": paragraphs[3]}) + "\n{broken\n")
    prepare(source_of([str(bad)], "jsonl"), gpt_tok, "gpt", out, bad_lines="skip")
    before = sorted(p.name for p in out.iterdir())
    many = (paragraphs * 8)[:5000]  # more than one chunk: the error comes after files were written
    bad.write_text("\n".join(json.dumps({"text": p}) for p in many) + "\n{broken\n")
    with pytest.raises(UserError, match="invalid JSON line"):
        prepare(source_of([str(bad)], "jsonl"), gpt_tok, "gpt", out, bad_lines="error")
    assert sorted(p.name for p in out.iterdir()) == before


def test_cli_mixture(tmp_path, paragraphs, gpt_tok, info):
    raw = tmp_path / "raw"
    (prose,) = write_inputs(raw / "prose", "text", [paragraphs[:6]])
    (code,) = write_inputs(raw / "code", "jsonl", [paragraphs[6:10]])
    (valid,) = write_inputs(raw / "valid", "text", [paragraphs[10:12]])
    cfg = tiny_config(tmp_path / "run", Path(prose), gpt_tok, **{"data.format": "auto"})
    cfg["data"]["train"] = {"prose": {"path": [prose], "weight": 0.75}, "code": {"path": [code], "weight": 0.25}}
    cfg["data"]["valid"] = [valid]
    out = tmp_path / "prepared"
    res = run_cli("trainer", "prepare", str(write_config(cfg, tmp_path / "c.yaml")), "--out", str(out))
    assert res.returncode == 0, res.stderr

    for source in parse_sources(cfg["data"]["train"]):
        shards = TokenShards(out / "train" / source.name, info, "gpt")
        np.testing.assert_array_equal(shards.window(0, shards.n_tokens), expected(source, info)[0])
        assert f"{source.name}: {shards.meta['n_docs']:,} documents, {shards.n_tokens:,} tokens" in res.stdout
    assert TokenShards(out / "valid", info, "gpt").meta["n_docs"] == 2
    pasted = yaml.safe_load(res.stdout[res.stdout.index("data:") :])
    assert pasted["data"] == {
        "format": "tokens",
        "train": {
            "code": {"path": [str(out / "train" / "code")], "weight": 0.25},
            "prose": {"path": [str(out / "train" / "prose")], "weight": 0.75},
        },
        "valid": [str(out / "valid")],
    }


def test_cli_single_source(tmp_path, paragraphs, gpt_tok, info, capsys):
    """In process (the mixture test runs the real command): one source -> OUT/train; prepared input refused."""
    (prose,) = write_inputs(tmp_path / "raw", "text", [paragraphs[:6]])
    cfg = tiny_config(tmp_path / "run", Path(prose), gpt_tok, **{"data.valid": []})
    out = tmp_path / "prepared"
    main(["prepare", str(write_config(cfg, tmp_path / "c.yaml")), "--out", str(out)])
    assert TokenShards(out / "train", info, "gpt").meta["n_docs"] == 6
    assert not (out / "valid").exists()
    assert f"data.train=[{out / 'train'}] data.format=tokens" in capsys.readouterr().out

    cfg["data"].update(valid=[str(out / "train")], format="auto")  # already prepared: refused before any work
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", str(write_config(cfg, tmp_path / "c2.yaml")), "--out", str(tmp_path / "p2")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "already prepared" in err, err
    assert not (tmp_path / "p2").exists()
