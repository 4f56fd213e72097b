"""The global sample sequence: rank partition, resume, formats, MLM masks, workers, wrap-around and input errors.

Everything is real: `datasets` streaming over tmp files, trained tokenizers, DataLoader worker processes.
"""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.data import build_stream, prepare, resolve_files
from trainer.data.shards import TokenShards
from trainer.errors import UserError
from trainer.tokenizer import load_tokenizer, train_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "train.txt"
SEQ = {"gpt": 16, "bert": 18}  # bert: 16 content tokens + [CLS] + [SEP]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One small corpus in text, jsonl and parquet; a tokenizer per arch; prepared shards per arch."""
    root = tmp_path_factory.mktemp("data")
    text = CORPUS.read_text()[:6000]
    text = text[: text.rindex("\n\n")]
    (root / "corpus.txt").write_text(text)
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    pq.write_table(pa.table({"text": paragraphs}), root / "corpus.parquet")
    tiny = "\n\n".join(paragraphs[:3])  # a corpus of a few dozen tokens: samples wrap around epochs quickly
    (root / "tiny.txt").write_text(tiny)
    tok = {
        "gpt": str(train_tokenizer("bpe", 320, [str(root / "corpus.txt")], root / "bpe")),
        "bert": str(train_tokenizer("wordpiece", 320, [str(root / "corpus.txt")], root / "wp")),
    }
    tokens = {}
    for arch in ("gpt", "bert"):
        tokens[arch] = str(root / f"tokens_{arch}")
        meta = prepare([str(root / "corpus.txt")], "auto", "text", tok[arch], arch, tokens[arch], shard_tokens=700)
        assert len(meta["shards"]) > 1 and meta["n_docs"] == len(paragraphs)
    return {"root": root, "tok": tok, "tokens": tokens, "paragraphs": paragraphs}


def stream(env, arch, files="corpus.txt", **kw):
    files = files if files in env["tokens"].values() else str(env["root"] / files)
    args = {"fmt": "auto", "text_field": "text", "tokenizer_path": env["tok"][arch], "seq_len": SEQ[arch], "seed": 1234}
    args.update({"dp_rank": 0, "dp_size": 1, "micro_batch": 4, "num_workers": 0}, **kw)
    return build_stream([files], arch=arch, **args)


def _args(fmt, tokenizer):
    return {
        "fmt": fmt,
        "text_field": "text",
        "tokenizer_path": tokenizer,
        "arch": "gpt",
        "seq_len": 16,
        "seed": 0,
        "dp_rank": 0,
        "dp_size": 1,
        "micro_batch": 2,
    }


def take(s, n_batches):
    return [next(s) for _ in range(n_batches)]


def by_index(batches):
    """{global sample index: (input_ids, labels)} of a list of batches."""
    out = {}
    for b in batches:
        for i, x, y in zip(b["sample_index"].tolist(), b["input_ids"], b["labels"]):
            assert i not in out
            out[i] = (x, y)
    return out


def assert_same_samples(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]), f"sample {i} differs"


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("dp", [2, 3])
def test_ranks_partition_the_global_sequence(env, arch, dp):
    reference = by_index(take(stream(env, arch, micro_batch=6), 4))  # samples 0..23
    assert sorted(reference) == list(range(24))
    union = {}
    for rank in range(dp):
        batches = take(stream(env, arch, dp_rank=rank, dp_size=dp, micro_batch=24 // dp // 4), 4)
        mine = by_index(batches)
        assert all(i % dp == rank for i in mine)
        assert batches[0]["sample_index"][0] == rank  # in order, starting at the rank
        assert not union.keys() & mine.keys()
        union.update(mine)
    assert_same_samples(union, reference)
    x, y = reference[5]
    assert x.shape == y.shape == (SEQ[arch],) and x.dtype == y.dtype == torch.long


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_resume_continues_exactly_also_at_another_dp(env, arch):
    reference = by_index(take(stream(env, arch, micro_batch=8), 10))  # samples 0..79
    k, dp, mb = 3, 2, 2
    streams = [stream(env, arch, dp_rank=r, dp_size=dp, micro_batch=mb) for r in range(dp)]
    for s in streams:
        take(s, k)
    states = [s.state_dict() for s in streams]
    assert states[0] == states[1] and json.loads(json.dumps(states[0])) == states[0]
    state = states[0]
    assert state["next_sample"] == k * mb * dp and state["doc"] > 0  # seek skips whole documents
    for new_dp, new_mb in ((2, 2), (3, 4), (1, 5)):
        resumed = {}
        for r in range(new_dp):
            s = stream(env, arch, dp_rank=r, dp_size=new_dp, micro_batch=new_mb, start_sample=12, seek=state)
            resumed.update(by_index(take(s, 3)))
        expected = range(12, 12 + 3 * new_mb * new_dp)
        assert sorted(resumed) == list(expected)
        assert_same_samples(resumed, {i: reference[i] for i in expected})
    # without a seek position the stream re-reads the prefix and lands on the same samples
    plain = by_index(take(stream(env, arch, micro_batch=3, start_sample=12), 2))
    assert_same_samples(plain, {i: reference[i] for i in range(12, 18)})
    # a state taken from a resumed stream is the same as one from an uninterrupted stream
    s = stream(env, arch, micro_batch=3, start_sample=12, seek=state)
    take(s, 4)
    full = stream(env, arch, micro_batch=4)
    take(full, 6)
    assert s.state_dict() == full.state_dict()


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_text_jsonl_parquet_and_prepared_shards_are_identical(env, arch):
    batches = {name: take(stream(env, arch, files=name), 6) for name in ("corpus.txt", "corpus.jsonl")}
    batches["parquet"] = take(stream(env, arch, files="corpus.parquet", num_workers=1), 6)
    batches["tokens"] = take(stream(env, arch, files=env["tokens"][arch], num_workers=2), 6)
    for name in ("corpus.jsonl", "parquet", "tokens"):
        assert_same_batches(batches["corpus.txt"], batches[name])
    # prepared shards resume from next_sample alone, also at another dp, and wrap around the epoch
    n = TokenShards(env["tokens"][arch], load_tokenizer(env["tok"][arch]), arch).n_tokens
    late = n // (SEQ[arch] - (2 if arch == "bert" else 0)) - 3  # its samples straddle the end of epoch 0
    s_text = stream(env, arch, micro_batch=2, dp_rank=1, dp_size=2, start_sample=late - 1)
    s_tok = stream(env, arch, files=env["tokens"][arch], micro_batch=2, dp_rank=1, dp_size=2, start_sample=late - 1)
    assert_same_batches(take(s_text, 4), take(s_tok, 4))
    assert s_tok.state_dict()["next_sample"] == late - 1 + 16


def test_mlm_masks_depend_only_on_seed_and_index(env):
    small = by_index(take(stream(env, "bert", micro_batch=2), 40))
    large = by_index(take(stream(env, "bert", micro_batch=8), 10))
    assert_same_samples(small, large)
    info = load_tokenizer(env["tok"]["bert"])
    shards = TokenShards(env["tokens"]["bert"], info, "bert")
    reseeded = by_index(take(stream(env, "bert", micro_batch=8, seed=99), 10))
    chosen = masked = unchanged = eligible = 0
    for i, (x, y) in large.items():
        labelled = y != -100
        original = torch.where(labelled, y, x)
        window = torch.from_numpy(shards.window(i * (SEQ["bert"] - 2), SEQ["bert"] - 2))
        assert torch.equal(original, torch.cat([torch.tensor([info.cls_id]), window, torch.tensor([info.sep_id])]))
        special = (original == info.cls_id) | (original == info.sep_id) | (original == info.pad_id)
        assert labelled.sum() >= 1 and not (labelled & special).any()
        assert not torch.isin(x[labelled & (x != info.mask_id)], torch.tensor(sorted(info.special_ids))).any()
        eligible += int((~special).sum())
        chosen += int(labelled.sum())
        masked += int((x[labelled] == info.mask_id).sum())
        unchanged += int((x[labelled] == y[labelled]).sum())
        rx, ry = reseeded[i]
        assert torch.equal(torch.where(ry != -100, ry, rx), original)  # same content, other masks
    assert not all(torch.equal(large[i][1], reseeded[i][1]) for i in large)
    assert 0.13 < chosen / eligible < 0.17
    assert 0.7 < masked / chosen < 0.9
    assert 0.04 < unchanged / chosen < 0.18
    assert 0.04 < (chosen - masked - unchanged) / chosen < 0.18


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_worker_counts_give_identical_batches(env, arch):
    runs = [take(stream(env, arch, num_workers=w, micro_batch=8), 8) for w in (0, 1, 2)]
    assert_same_batches(runs[0], runs[1])
    assert_same_batches(runs[0], runs[2])
    s = stream(env, arch, files="corpus.jsonl", num_workers=2, micro_batch=8, start_sample=16)
    assert_same_batches(runs[0][2:5], take(s, 3))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine, on purpose
def test_wrap_around_epochs(env):
    info = load_tokenizer(env["tok"]["gpt"])
    content = []
    for paragraph in env["paragraphs"][:3]:
        content += info.tokenizer.encode(paragraph, add_special_tokens=False).ids + [info.eos_id]
    n, t = len(content), SEQ["gpt"]
    assert n < 200
    batches = take(stream(env, "gpt", files="tiny.txt", micro_batch=5, num_workers=2), 10)  # ~4 epochs
    for i, (x, y) in by_index(batches).items():
        expected = torch.tensor([content[(i * t + j) % n] for j in range(t + 1)])
        assert torch.equal(x, expected[:-1]) and torch.equal(y, expected[1:])
    s = stream(env, "gpt", files="tiny.txt", micro_batch=5)
    take(s, 6)
    state = s.state_dict()
    assert state["epoch"] >= 2
    # more workers than documents per epoch: each still yields its share, in order
    resumed = stream(env, "gpt", files="tiny.txt", micro_batch=5, start_sample=30, seek=state, num_workers=4)
    assert_same_batches(batches[6:], take(resumed, 4))
    tokens_dir = env["root"] / "tiny_tokens"
    prepare([str(env["root"] / "tiny.txt")], "text", "text", env["tok"]["gpt"], "gpt", tokens_dir, shard_tokens=50)
    assert_same_batches(batches, take(stream(env, "gpt", files=str(tokens_dir), micro_batch=5), 10))


def test_bad_json_lines_skipped_or_fatal(env, tmp_path, capfd):
    good = [json.dumps({"text": p}) for p in env["paragraphs"][:3]]  # the documents of tiny.txt
    lines = good[:2] + ["{broken", json.dumps({"other": 1})] + good[2:] + ["", json.dumps({"text": 5})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    expected = take(stream(env, "gpt", files="tiny.txt"), 10)  # several epochs
    assert_same_batches(expected, take(stream(env, "gpt", files=str(bad)), 10))
    err = capfd.readouterr().err
    assert err.count("skipped 3 invalid JSON line(s)") == 1 and str(bad) in err  # once, not once per epoch
    for workers in (0, 2):
        s = stream(env, "gpt", files=str(bad), bad_lines="error", num_workers=workers)
        with pytest.raises(UserError) as exc:
            take(s, 1)
        assert str(exc.value).startswith(f"{bad}:3: invalid JSON line") and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="closed"):
        next(s)  # the failed stream stopped its workers and stays stopped


def test_input_errors(env, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_files([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="matches no files"):
        stream(env, "gpt", files="nothing_*.jsonl")
    with pytest.raises(UserError, match="mix formats"):
        build_stream(
            [str(env["root"] / "corpus.txt"), str(env["root"] / "corpus.jsonl")], **_args("auto", env["tok"]["gpt"])
        )
    other = train_tokenizer("bpe", 300, [str(env["root"] / "tiny.txt")], tmp_path / "other")
    with pytest.raises(UserError, match="another tokenizer"):
        build_stream([env["tokens"]["gpt"]], **_args("tokens", other))
    relabelled = tmp_path / "relabelled"
    shutil.copytree(env["tokens"]["gpt"], relabelled)
    meta = json.loads((relabelled / "meta.json").read_text())
    (relabelled / "meta.json").write_text(json.dumps({**meta, "arch": "bert"}))
    with pytest.raises(UserError, match="prepared for arch 'bert', not 'gpt'"):
        build_stream([str(relabelled)], **_args("auto", env["tok"]["gpt"]))
    with pytest.raises(UserError, match="no <|endoftext|>"):
        stream(env, "gpt", tokenizer_path=env["tok"]["bert"])
    with pytest.raises(UserError, match="no column 'body'"):
        take(stream(env, "gpt", files="corpus.parquet", text_field="body"), 1)
    with pytest.raises(UserError, match="dp_rank=2 is not below"):
        stream(env, "gpt", dp_rank=2, dp_size=2)
    with pytest.raises(UserError, match="start_sample=8"):
        stream(env, "gpt", start_sample=8, seek={"next_sample": 4, "epoch": 0, "doc": 1, "offset": 0})
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\n\n\xc3\x28")
    with pytest.raises(UserError, match="cannot read .*binary.txt.* as text") as exc:
        take(stream(env, "gpt", files=str(binary), num_workers=1), 1)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="set data.format=tokens or auto"):
        stream(env, "gpt", files=env["tokens"]["gpt"], fmt="text")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n\n")
    for workers in (0, 2):
        with pytest.raises(UserError, match="no documents found") as exc:
            take(stream(env, "gpt", files=str(empty), num_workers=workers), 1)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="no tokens"):
        prepare([str(empty)], "auto", "text", env["tok"]["gpt"], "gpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "binary.txt",
        "empty.txt",
        "other",
        "relabelled",
    ]  # nothing half-made
    with pytest.raises(UserError, match="already exists"):
        prepare([str(empty)], "auto", "text", env["tok"]["gpt"], "gpt", env["tokens"]["gpt"])
