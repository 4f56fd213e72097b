"""The global sample sequence: shuffle, mixtures, logical streams, resume at any dp, formats, MLM masks, workers,
wrap-around, hold-out, `trainer data` and input errors.

Everything is real: files in tmp dirs, trained tokenizers, `datasets` sources, DataLoader worker processes.
"""

import gc
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import run_cli

import trainer.data.documents as documents_module
import trainer.data.logical_streams as streams_module
import trainer.data.sample_stream as stream_module
from trainer.cli import main
from trainer.config import load_config
from trainer.data import build_stream, merge_states, parse_sources, prepare, resolve_files
from trainer.data.shards import TokenShards
from trainer.errors import UserError
from trainer.tokenizer import load_tokenizer, train_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "train.txt"
SEQ = {"gpt": 16, "bert": 18}  # bert: 16 content tokens + [CLS] + [SEP]
TODAY = {"shuffle": False, "streams": 1}  # the corpus order: one stream, no shuffling


def paragraphs_of(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small corpus in every format; a mixture's two sources (prose: large, verse: small); tokenizers; shards."""
    root = tmp_path_factory.mktemp("data")
    full = CORPUS.read_text()
    text = full[:6000]
    text = text[: text.rindex("\n\n")]
    (root / "corpus.txt").write_text(text)
    paragraphs = paragraphs_of(text)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    pq.write_table(pa.table({"text": paragraphs}), root / "corpus.parquet", row_group_size=20)
    datasets.Dataset.from_dict({"text": paragraphs}).save_to_disk(str(root / "saved"))
    (root / "local_dataset").mkdir()
    half = len(paragraphs) // 2
    for i, part in enumerate((paragraphs[:half], paragraphs[half:])):  # a local dataset folder of two shards
        pq.write_table(pa.table({"text": part}), root / "local_dataset" / f"train-{i:05d}-of-00002.parquet")
    (root / "tiny.txt").write_text("\n\n".join(paragraphs[:3]))  # a few dozen tokens: wraps around quickly
    prose = full[10_000:70_000]
    (root / "prose.txt").write_text(prose[: prose.rindex("\n\n")])
    verse = paragraphs_of(full[80_000:81_200])
    (root / "verse.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in verse))
    tok = {
        "gpt": str(train_tokenizer("bpe", 320, [str(root / "corpus.txt")], root / "bpe")),
        "bert": str(train_tokenizer("wordpiece", 320, [str(root / "corpus.txt")], root / "wp")),
    }
    tokens = {}
    for arch in ("gpt", "bert"):
        tokens[arch] = str(root / f"tokens_{arch}")
        prepare(parse_sources([str(root / "corpus.txt")])[0], tok[arch], arch, tokens[arch])
    for name in ("prose.txt", "verse.jsonl", "tiny.txt"):
        prepare(parse_sources([str(root / name)])[0], tok["gpt"], "gpt", root / f"tokens_{name.split('.')[0]}")
    return {"root": root, "tok": tok, "tokens": tokens, "paragraphs": paragraphs}


def stream(env, arch="gpt", files="corpus.txt", **kw):
    if isinstance(files, str):
        files = [files if Path(files).is_absolute() else str(env["root"] / files)]
    args = {"tokenizer_path": env["tok"][arch], "objective": arch, "seq_len": SEQ[arch], "seed": 1234, **TODAY}
    args.update({"dp_rank": 0, "dp_size": 1, "micro_batch": 4, "num_workers": 0}, **kw)
    return build_stream(files, **args)


def mixture(env, prepared: bool, weights=(0.3, 0.7)) -> dict:
    if prepared:
        paths = {"prose": env["root"] / "tokens_prose", "verse": env["root"] / "tokens_verse"}
    else:
        paths = {"prose": env["root"] / "prose.txt", "verse": env["root"] / "verse.jsonl"}
    return {name: {"path": [str(p)], "weight": w} for (name, p), w in zip(paths.items(), (weights[1], weights[0]))}


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


def run_layout(make, dp: int, global_batch: int, steps: int, state=None, **kw):
    """`steps` global batches on dp ranks (ranks stepped in lockstep); returns ({g: sample}, merged state)."""
    ranks = [make(dp_rank=r, dp_size=dp, micro_batch=global_batch // dp, state=state, **kw) for r in range(dp)]
    samples = {}
    for _ in range(steps):
        for s in ranks:
            samples.update(by_index([next(s)]))
    merged = json.loads(json.dumps(merge_states([s.state_dict() for s in ranks])))  # as a checkpoint holds it
    for s in ranks:
        s.close()
    return samples, merged


def digest(samples: dict) -> str:
    h = hashlib.sha256()
    for g in sorted(samples):
        h.update(f"{g}:".encode() + samples[g][0].numpy().tobytes() + samples[g][1].numpy().tobytes())
    return h.hexdigest()


# ---- the order: shuffle, mixture, any dp, resume -----------------------------------------------------------------


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "raw"])
def test_order_is_the_same_at_any_dp_and_through_resumes(env, prepared):
    """Shuffle on, a two-source mixture: dp 1, 2 and 4 and a run resumed 4 -> 2 -> 1 train the same samples."""

    def make(**kw):
        return stream(env, files=mixture(env, prepared), shuffle=True, streams=4, block=4, **kw)

    g, steps = 8, 12
    hashes = {}
    reference, _ = run_layout(make, 1, g, steps)
    assert sorted(reference) == list(range(g * steps))
    hashes["dp1"] = digest(reference)
    hashes["dp2"] = digest(run_layout(make, 2, g, steps, num_workers=1)[0])
    hashes["dp4"] = digest(run_layout(make, 4, g, steps)[0])
    first, state = run_layout(make, 4, g, 3)
    second, state = run_layout(make, 2, g, 4, state=state, num_workers=2)
    third, state = run_layout(make, 1, g, steps - 7, state=state)
    hashes["4->2->1"] = digest({**first, **second, **third})
    assert len(set(hashes.values())) == 1, hashes
    assert state["next_sample"] == g * steps
    assert sum(state["mixture"]["counts"].values()) == g * steps and min(state["mixture"]["counts"].values()) > 0


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("dp", [2, 3])
def test_ranks_partition_the_global_sequence(env, arch, dp):
    def make(**kw):
        return stream(env, arch, shuffle=True, streams=6, block=4, **kw)

    reference = by_index(take(make(micro_batch=6), 4))  # samples 0..23
    assert sorted(reference) == list(range(24))
    union = {}
    for rank in range(dp):
        batches = take(make(dp_rank=rank, dp_size=dp, micro_batch=24 // dp // 4), 4)
        mine = by_index(batches)
        assert all(i % dp == rank for i in mine)
        assert batches[0]["sample_index"][0] == rank  # in order, starting at the rank
        assert not union.keys() & mine.keys()
        union.update(mine)
    assert_same_samples(union, reference)
    x, y = reference[5]
    assert x.shape == y.shape == (SEQ[arch],) and x.dtype == y.dtype == torch.long


def test_each_rank_reads_only_its_own_streams(env, monkeypatch):
    """dp 2, L = 4: rank r opens only the units of streams r and r + 2; workers split them and change nothing."""
    opened: list = []
    real = streams_module.read_unit

    def counting(source, unit, *args, **kwargs):
        opened.append(unit)
        return real(source, unit, *args, **kwargs)

    monkeypatch.setattr(streams_module, "read_unit", counting)

    def make(**kw):
        return stream(env, files="prose.txt", shuffle=True, streams=4, block=4, **kw)

    per_rank = []
    for rank in range(2):
        opened.clear()
        s = make(dp_rank=rank, dp_size=2, micro_batch=4)
        take(s, 30)
        plan = s.plans[0]
        assert len(plan.units) >= 8  # the file was cut into byte ranges
        mine = {plan.unit_at(st, k) for st in (rank, rank + 2) for k in range(len(plan.units))}
        theirs = {plan.unit_at(st, k) for st in (1 - rank, 3 - rank) for k in range(2)}
        assert opened and set(opened) <= mine
        assert not set(opened) & (theirs - mine)
        per_rank.append(set(opened))
        s.close()
    assert not per_rank[0] & per_rank[1]
    monkeypatch.undo()
    runs = [take(make(num_workers=w, micro_batch=8), 10) for w in (0, 1, 2)]
    assert_same_batches(runs[0], runs[1])
    assert_same_batches(runs[0], runs[2])


def test_streams_not_dividing_dp_read_everything_with_one_warning(env, capfd):
    def make(**kw):
        return stream(env, shuffle=True, streams=4, block=4, **kw)

    reference = by_index(take(make(micro_batch=6), 3))
    union = {}
    for rank in range(3):
        union.update(by_index(take(make(dp_rank=rank, dp_size=3, micro_batch=2), 3)))
    assert_same_samples(union, reference)
    assert capfd.readouterr().err.count("data.streams=4 is not a multiple of the data-parallel size 3") == 1


def shares_ok(counts: list[dict], weights: dict, batch: int) -> tuple[float, float]:
    """Largest deviation from weight x samples over every prefix and over every global batch."""
    total = sum(weights.values())
    prefix = max(abs(c[n] - weights[n] / total * batch * i) for i, c in enumerate(counts) for n in weights)
    per_batch = max(
        abs(b[n] - a[n] - weights[n] / total * batch) for a, b in itertools.pairwise(counts) for n in weights
    )
    return prefix, per_batch


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "raw"])
def test_mixture_shares_hold_and_the_small_source_wraps(env, prepared):
    s = stream(env, files=mixture(env, prepared, (0.3, 0.7)), shuffle=True, streams=2, block=4, micro_batch=10)
    counts = [s.consumed()]
    rows = []
    for _ in range(30):
        rows += s.describe(10)
        counts.append(s.consumed())
    prefix, per_batch = shares_ok(counts, {"prose": 0.7, "verse": 0.3}, 10)
    assert prefix < 1.5 and per_batch < 2  # the bounds docs/data.md states
    assert counts[-1] == {"verse": 90, "prose": 210}
    prose = [(r["file"], r["document"], r["offset"]) for r in rows if r["source"] == "prose"]
    assert len(set(prose)) == len(prose)  # the large source is still in its first pass: no sample twice
    info = load_tokenizer(env["tok"]["gpt"])
    verse_tokens = sum(
        len(info.tokenizer.encode(json.loads(line)["text"]).ids) + 1
        for line in (env["root"] / "verse.jsonl").read_text().splitlines()
    )
    assert counts[-1]["verse"] > 1.5 * verse_tokens / SEQ["gpt"]  # the small one went round more than once
    if prepared:
        assert {r["epoch"] for r in rows if r["source"] == "prose"} == {0}
        assert max(r["epoch"] for r in rows if r["source"] == "verse") >= 1


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "raw"])
def test_changed_weights_at_resume_repeat_nothing(env, prepared):
    s = stream(env, files=mixture(env, prepared, (0.5, 0.5)), shuffle=True, streams=2, block=4, micro_batch=8)
    before = [r for _ in range(3) for r in s.describe(8)]
    state = json.loads(json.dumps(merge_states([s.state_dict()])))
    assert state["mixture"]["counts"] == {"prose": 12, "verse": 12}
    resumed = stream(
        env, files=mixture(env, prepared, (0.1, 0.9)), shuffle=True, streams=2, block=4, micro_batch=8, state=state
    )
    after = [r for _ in range(3) for r in resumed.describe(8)]
    assert [r["index"] for r in after] == list(range(24, 48))
    prose = [(r["file"], r["document"], r["offset"]) for r in before + after if r["source"] == "prose"]
    assert len(prose) == 12 + 22 and len(set(prose)) == len(prose)  # no prose sample twice
    verse = [(r["file"], r["document"], r["offset"]) for r in before + after if r["source"] == "verse"]
    assert len(verse) == 12 + 2 and len(set(verse)) == len(verse)
    assert resumed.consumed() == {"prose": 34, "verse": 14}


def test_prepared_epochs_are_permutations(env):
    info = load_tokenizer(env["tok"]["gpt"])
    shards = TokenShards(env["tokens"]["gpt"], info, "gpt")
    per_epoch = (shards.n_tokens - 1) // SEQ["gpt"]
    s = stream(env, files=env["tokens"]["gpt"], shuffle=True, micro_batch=1)
    sampler = s.samplers[0]
    assert sampler.per_epoch == per_epoch
    epoch0 = [sampler.position(j) for j in range(per_epoch)]
    epoch1 = [sampler.position(j) for j in range(per_epoch, 2 * per_epoch)]
    every = [w * SEQ["gpt"] for w in range(per_epoch)]
    assert sorted(epoch0) == every and sorted(epoch1) == every  # each sample exactly once per epoch
    assert epoch0 != every and epoch0 != epoch1  # shuffled, and differently each epoch
    other = stream(env, files=env["tokens"]["gpt"], shuffle=True, micro_batch=1, seed=99).samplers[0]
    assert [other.position(j) for j in range(per_epoch)] != epoch0
    first = next(s)
    assert torch.equal(first["input_ids"][0], torch.from_numpy(shards.window(epoch0[0], SEQ["gpt"])))


def test_shuffle_off_is_the_corpus_order_and_shuffle_on_is_not(env):
    info = load_tokenizer(env["tok"]["gpt"])
    content = []
    for paragraph in env["paragraphs"]:
        content += info.tokenizer.encode(paragraph, add_special_tokens=False).ids + [info.eos_id]
    t = SEQ["gpt"]
    plain = by_index(take(stream(env, micro_batch=8), 4))
    for i, (x, _) in plain.items():
        assert x.tolist() == content[i * t : i * t + t]
    prose = {"files": "prose.txt", "streams": 4, "block": 4, "micro_batch": 8}
    plain = by_index(take(stream(env, **prose), 4))
    shuffled = by_index(take(stream(env, shuffle=True, **prose), 4))
    assert sum(torch.equal(plain[i][0], shuffled[i][0]) for i in plain) < 4
    reseeded = by_index(take(stream(env, shuffle=True, seed=5, **prose), 4))
    assert sum(torch.equal(reseeded[i][0], shuffled[i][0]) for i in plain) < 4


# ---- formats and sources -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_every_format_gives_the_same_samples(env, arch):
    """text, jsonl, parquet, prepared shards, a save_to_disk directory and a datasets folder (load_dataset, streamed)
    hold the same documents: in corpus order (one stream, no shuffle) they give the same samples."""
    root = env["root"]
    batches = {name: take(stream(env, arch, files=name), 6) for name in ("corpus.txt", "corpus.jsonl")}
    batches["parquet"] = take(stream(env, arch, files="corpus.parquet", num_workers=1), 6)
    batches["tokens"] = take(stream(env, arch, files=env["tokens"][arch]), 6)
    batches["saved"] = take(stream(env, arch, files="saved"), 6)
    local = {"local": {"dataset": str(root / "local_dataset"), "split": "train"}}
    batches["dataset"] = take(stream(env, arch, files=local, num_workers=1), 6)
    for name in ("corpus.jsonl", "parquet", "tokens", "saved", "dataset"):
        assert_same_batches(batches["corpus.txt"], batches[name])
    # later samples too, which straddle the end of the first pass, from a fresh start at sample `late`
    n = TokenShards(env["tokens"][arch], load_tokenizer(env["tok"][arch]), arch).n_tokens
    late = n // (SEQ[arch] - (2 if arch == "bert" else 0)) - 3
    start = late // 2 * 2  # a micro-batch boundary at dp 2
    s_text = stream(env, arch, micro_batch=2, dp_rank=1, dp_size=2, start_sample=start)
    s_tok = stream(env, arch, files=env["tokens"][arch], micro_batch=2, dp_rank=1, dp_size=2, start_sample=start)
    assert_same_batches(take(s_text, 4), take(s_tok, 4))
    assert s_tok.state_dict()["next_sample"] == start + 16


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


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine, on purpose
def test_wrap_around_and_resume_inside_a_block(env):
    info = load_tokenizer(env["tok"]["gpt"])
    content = []
    for paragraph in env["paragraphs"][:3]:
        content += info.tokenizer.encode(paragraph, add_special_tokens=False).ids + [info.eos_id]
    n, t = len(content), SEQ["gpt"]
    assert n < 200
    batches = take(stream(env, files="tiny.txt", micro_batch=5, num_workers=2), 10)  # ~4 passes
    for i, (x, y) in by_index(batches).items():
        expected = torch.tensor([content[(i * t + j) % n] for j in range(t + 1)])
        assert torch.equal(x, expected[:-1]) and torch.equal(y, expected[1:])
    assert_same_batches(batches, take(stream(env, files=str(env["root"] / "tokens_tiny"), micro_batch=5), 10))
    # shuffled blocks of 8: a state taken mid-block resumes exactly, with more workers than streams
    shuffled = take(stream(env, files="tiny.txt", micro_batch=5, shuffle=True, block=8), 10)
    s = stream(env, files="tiny.txt", micro_batch=5, shuffle=True, block=8)
    take(s, 5)
    state = json.loads(json.dumps(merge_states([s.state_dict()])))
    assert state["next_sample"] == 25 and state["sources"]["train"]["streams"]["0"]["cursor"]["block"] == 3
    resumed = stream(env, files="tiny.txt", micro_batch=5, shuffle=True, block=8, state=state, num_workers=4)
    assert_same_batches(shuffled[5:], take(resumed, 5))


def test_valid_fraction_holds_out_whole_documents(env):
    holdout = 0.2
    train = stream(env, shuffle=True, streams=2, micro_batch=1, holdout=(holdout, False))
    valid = stream(env, streams=2, micro_batch=1, holdout=(holdout, True))
    train_docs = {r["document"] for r in train.describe(500)}  # two passes and more: every document is seen
    valid_docs = {r["document"] for r in valid.describe(200)}
    assert train_docs and valid_docs and not train_docs & valid_docs
    everything = {r["document"] for r in stream(env, micro_batch=1).describe(300)}
    assert train_docs | valid_docs == everything
    assert 0.1 < len(valid_docs) / len(everything) < 0.3


def test_trainer_data_prints_the_order(env, tmp_path):
    config = {
        "run": {"seed": 1234},
        "data": {
            "train": mixture(env, prepared=False),
            "tokenizer": env["tok"]["gpt"],
            "seq_len": SEQ["gpt"],
            "streams": 4,
            "shuffle_block": 4,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    r = run_cli("trainer", "data", str(path), "--range", "5:13", "--dp", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["index"] for row in rows] == list(range(5, 13))
    assert [row["rank"] for row in rows] == [1, 0] * 4
    fields = ["index", "source", "file", "document", "line", "document_byte_offset", "offset", "rank", "stream", "text"]
    assert list(rows[0]) == fields
    s = stream(env, files=mixture(env, prepared=False), shuffle=True, streams=4, block=4, micro_batch=13)
    samples = by_index([next(s)])
    info = load_tokenizer(env["tok"]["gpt"])
    for row in rows:
        assert row["text"] == info.tokenizer.decode(samples[row["index"]][0].tolist(), skip_special_tokens=False)
        assert row["source"] in ("prose", "verse") and Path(row["file"]).name in ("prose.txt", "verse.jsonl")
    bad = run_cli("trainer", "data", str(path), "--range", "9:3")
    assert bad.returncode == 2 and "must have 0 <= A < B" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_during_trainer_data_says_what_stopped(env, tmp_path):
    """Ctrl-C ends `trainer data` with one line about `trainer data`, not the training run's checkpoint line."""
    import signal

    config = {"run": {"seed": 1}, "data": {"train": [str(env["root"] / "corpus.txt")], "tokenizer": env["tok"]["gpt"]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "trainer", "data", str(path), "--range", "0:100000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CORPUS.parents[2])
    assert proc.stdout.readline().startswith("{")  # it is printing samples
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last == "interrupted (Ctrl-C): `trainer data` stopped" and "Traceback" not in err, err[-2000:]


# ---- errors ------------------------------------------------------------------------------------------------------


def test_bad_json_lines_skipped_or_fatal(env, tmp_path, capfd):
    good = [json.dumps({"text": p}) for p in env["paragraphs"][:3]]  # the documents of tiny.txt
    lines = good[:2] + ["{broken", json.dumps({"other": 1})] + good[2:] + ["", json.dumps({"text": 5})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    expected = take(stream(env, files="tiny.txt"), 10)  # several passes
    assert_same_batches(expected, take(stream(env, files=str(bad)), 10))
    err = capfd.readouterr().err  # once, not once per pass; valid JSON without the field is not "invalid JSON"
    assert err.count(f"warning: {bad}: skipped 2 lines without a string 'text' field") == 1, err
    assert err.count(f"{bad}:") == 1 and "and 1 line of invalid JSON (data.text_field=text, " in err, err
    for workers in (0, 2):
        s = stream(env, files=str(bad), bad_lines="error", num_workers=workers)
        with pytest.raises(UserError) as exc:
            take(s, 1)
        assert str(exc.value).startswith(f"{bad}:3: invalid JSON line") and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="closed"):
        next(s)  # the failed stream stopped its workers and stays stopped


def test_lines_without_text_are_summarised_once_per_file(env, tmp_path, capfd):
    """Lines without a string text field (and lines that are not JSON) are skipped; each file read says so in one
    line with its counts, however many units it is cut into and however many passes are read."""
    good = [json.dumps({"text": p}) for p in env["paragraphs"]]
    (tmp_path / "bad").mkdir()
    (tmp_path / "clean").mkdir()
    lines_a, lines_b = [], []
    for i, line in enumerate(good):  # a: 25 lines without text, spread over the whole file, and 3 not JSON
        lines_a.append(line)
        if i < 25:
            lines_a.append(json.dumps({"body": "no text here", "n": i}))
        if i in (3, 17, 30):
            lines_a.append('{"text": "cut off')
    for i, line in enumerate(good[:20]):  # b: 7 lines that are JSON, but no string text (null, a number, a list)
        lines_b.append(line)
        if i < 7:
            lines_b.append([json.dumps({"text": None}), json.dumps({"text": 3}), "[1, 2]"][i % 3])
    bad_a, bad_b = tmp_path / "bad" / "a.jsonl", tmp_path / "bad" / "b.jsonl"
    bad_a.write_text("\n".join(lines_a) + "\n")
    bad_b.write_text("\n".join(lines_b) + "\n")
    (tmp_path / "clean" / "a.jsonl").write_text("\n".join(good) + "\n")
    (tmp_path / "clean" / "b.jsonl").write_text("\n".join(good[:20]) + "\n")
    files = {kind: [str(tmp_path / kind / "a.jsonl"), str(tmp_path / kind / "b.jsonl")] for kind in ("bad", "clean")}
    expected = take(stream(env, files=files["clean"]), 60)  # several passes
    capfd.readouterr()
    for workers in (0, 1):  # in this process, and in a DataLoader worker
        got = stream(env, files=files["bad"], num_workers=workers)
        assert len(got.plans[0].units) > 2  # the file is read unit by unit
        assert_same_batches(expected, take(got, 60))
        got.close()
        err = capfd.readouterr().err
        summaries = [line for line in err.splitlines() if str(tmp_path / "bad") in line]
        settings = "(data.text_field=text, data.bad_lines=skip)"
        assert sorted(summaries) == [
            f"warning: {bad_a}: skipped 25 lines without a string 'text' field and 3 lines of invalid JSON {settings}",
            f"warning: {bad_b}: skipped 7 lines without a string 'text' field {settings}",
        ], err
        documents_module._REPORTED.clear()  # the next run's process reports again
    with pytest.raises(UserError, match=rf"^{bad_b}:2: line has no string 'text' field \(data.text_field=text\)"):
        take(stream(env, files=[str(bad_b)], bad_lines="error"), 1)


def test_valid_set_errors_name_data_valid(env, tmp_path):
    """A text file as data.valid under data.format=jsonl has no JSON documents: the error names data.valid."""
    from trainer.data.from_config import build_data_stream, data_sources

    cfg = load_config(
        None,
        [
            f"data.train=[{env['root'] / 'corpus.jsonl'}]",
            f"data.valid=[{env['root'] / 'tiny.txt'}]",
            "data.format=jsonl",
            f"data.tokenizer={env['tok']['gpt']}",
            f"data.seq_len={SEQ['gpt']}",
        ],
    )
    train, valid = data_sources(cfg)
    assert [s.name for s in train] == ["train"] and [s.name for s in valid] == ["valid"]
    s = build_data_stream(cfg, _OneRank(), valid, training=False, micro_batch=1)
    with pytest.raises(UserError) as exc:
        next(s)
    message = str(exc.value)
    assert message.startswith(f"data.valid ({env['root'] / 'tiny.txt'}) has no documents"), message
    assert "train" not in message


def test_a_valid_set_that_gives_nothing_stops_the_run_before_it_trains(env, tmp_path):
    """A valid set without documents is found at start-up (each rank reads its first evaluation sample), not at the
    first evaluation after hours of training: one line, and no run directory written."""
    from trainer.train import train

    (tmp_path / "blank.txt").write_text("\n\n\n")
    cfg = load_config(
        None,
        [
            f"data.train=[{env['root'] / 'corpus.txt'}]",
            f"data.valid=[{tmp_path / 'blank.txt'}]",
            f"data.tokenizer={env['tok']['gpt']}",
            f"data.seq_len={SEQ['gpt']}",
            "model.preset=gpt-tiny",
            "train.eval_every=1000",
            "train.steps=2000",
            "data.num_workers=0",
            "log.wandb.mode=disabled",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(UserError, match=r"^data.valid \(.*blank.txt\) has no documents"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_format_errors_name_the_key_the_path_and_the_fix(env, tmp_path):
    """data.format=tokens with prepared train shards beside a raw jsonl valid set (the reported case): the error
    names data.valid, the file it refused and two fixes. So do the other format refusals."""
    raw, prepared = str(env["root"] / "corpus.jsonl"), env["tokens"]["gpt"]
    assert [s.fmt for s in parse_sources([prepared], "tokens")] == ["tokens"]
    with pytest.raises(UserError) as exc:
        parse_sources([raw], "tokens", key="data.valid")
    message = str(exc.value)
    assert message.startswith("data.valid: data.format=tokens needs a directory written by `trainer prepare`"), message
    assert f"but {raw!r} is a jsonl file" in message, message
    assert "set data.format=auto" in message and "set data.valid=[OUT/valid]" in message, message

    text = str(env["root"] / "corpus.txt")
    with pytest.raises(UserError, match=rf"^data.train.a: data.train.a.format=tokens .* but '{text}' is a text file"):
        parse_sources({"a": {"path": [text], "format": "tokens"}})
    with pytest.raises(UserError, match=rf"^data.valid: data.format=jsonl reads raw files, but '{prepared}' is a dir"):
        parse_sources([prepared], "jsonl", key="data.valid")
    other = train_tokenizer("bpe", 300, [str(env["root"] / "tiny.txt")], tmp_path / "other")
    with pytest.raises(UserError, match=rf"^data.train: {prepared} was prepared with another tokenizer"):
        stream(env, files=prepared, tokenizer_path=str(other))


class _OneRank:
    dp_rank, dp = 0, 1


def test_trainer_data_numbers_documents_as_users_count_them(env, tmp_path, capsys):
    """`trainer data` names a text/jsonl document by its number in its file (from 0), the line it starts on (from 1,
    as editors number lines) and its byte offset under its own name; shards prepared from the file give the same
    number and offset. A blank and a bad jsonl line make line and document numbers differ."""
    docs = env["paragraphs"][:12]
    lines = [json.dumps({"text": d}) for d in docs]
    lines[3:3] = ["", "{not json"]
    jsonl, text = tmp_path / "c.jsonl", tmp_path / "c.txt"
    jsonl.write_text("\n".join(lines) + "\n")
    text.write_text("\n\n\n".join(docs) + "\n")
    prepare(parse_sources([str(jsonl)])[0], env["tok"]["gpt"], "gpt", tmp_path / "prepared")

    def where(path: Path) -> list[tuple[int, int]]:
        """(byte offset, line from 1) of each document, found by searching the file for it."""
        raw, found, pos = path.read_text(), [], 0
        for d in docs:
            pos = raw.index(json.dumps({"text": d}) if path.suffix == ".jsonl" else d, pos)
            found.append((len(raw[:pos].encode()), raw[:pos].count("\n") + 1))
        return found

    def records(path: Path, fmt: str) -> list[dict]:
        data = {"train": [str(path)], "format": fmt, "tokenizer": env["tok"]["gpt"], "seq_len": SEQ["gpt"]}
        data.update(streams=2, shuffle_block=4, num_workers=0)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"data": data}))
        main(["data", str(tmp_path / "cfg.yaml"), "--range", "0:60"])
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert where(jsonl)[5] == (len("".join(line + "\n" for line in lines[:7]).encode()), 8)  # document 5: line 8
    for path, fmt in ((jsonl, "jsonl"), (text, "text"), (tmp_path / "prepared", "tokens")):
        expected = where(jsonl if fmt == "tokens" else path)
        rows = records(path, fmt)
        assert len({r["document"] for r in rows}) > 6, rows
        for r in rows:
            byte_offset, line = expected[r["document"]]
            assert r["document_byte_offset"] == byte_offset and r["line"] == (None if fmt == "tokens" else line), r
            assert r["text"].split("<|endoftext|>")[0] in docs[r["document"]], r


def test_trainer_data_shows_progress_while_reaching_the_range(env, tmp_path, capfd, monkeypatch):
    """Reading through the samples before --range A:B can take long: stderr says how far it is (every
    SKIP_PROGRESS_S), stdout holds only the JSON lines."""
    path = tmp_path / "cfg.yaml"
    data = {"train": [str(env["root"] / "corpus.txt")], "tokenizer": env["tok"]["gpt"], "seq_len": SEQ["gpt"]}
    path.write_text(yaml.safe_dump({"data": {**data, "streams": 4, "shuffle_block": 4, "num_workers": 0}}))
    main(["data", str(path), "--range", "300:303"])  # fast: no progress lines
    out, err = capfd.readouterr()
    assert [json.loads(line)["index"] for line in out.splitlines()] == [300, 301, 302] and err == ""
    monkeypatch.setattr(stream_module, "SKIP_PROGRESS_S", 0.0)  # "slow": a line at every sample
    main(["data", str(path), "--range", "300:303"])
    out, err = capfd.readouterr()
    assert [json.loads(line)["index"] for line in out.splitlines()] == [300, 301, 302]
    progress = err.splitlines()
    assert len(progress) == 300 and all(line.startswith("data: reaching sample 300 ") for line in progress), err
    assert "1 of 300 read" in progress[0] and "300 of 300 read (100.0%)" in progress[-1]


def test_input_errors(env, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_files([str(tmp_path / "missing.txt")])
    with pytest.raises(UserError, match="matches no files"):
        stream(env, files="nothing_*.jsonl")
    with pytest.raises(UserError, match="mix formats"):
        stream(env, files=[str(env["root"] / "corpus.txt"), str(env["root"] / "corpus.jsonl")])
    other = train_tokenizer("bpe", 300, [str(env["root"] / "tiny.txt")], tmp_path / "other")
    with pytest.raises(UserError, match="another tokenizer"):
        stream(env, files=env["tokens"]["gpt"], tokenizer_path=str(other))
    relabelled = tmp_path / "relabelled"
    shutil.copytree(env["tokens"]["gpt"], relabelled)
    meta = json.loads((relabelled / "meta.json").read_text())
    (relabelled / "meta.json").write_text(json.dumps({**meta, "arch": "bert"}))
    with pytest.raises(UserError, match="prepared for masked samples, not causal ones"):
        stream(env, files=str(relabelled))
    with pytest.raises(UserError, match="no <|endoftext|>"):
        stream(env, tokenizer_path=env["tok"]["bert"])
    with pytest.raises(UserError, match="no column 'body'"):
        take(stream(env, files="corpus.parquet", text_field="body"), 1)
    with pytest.raises(UserError, match="dp_rank=2 is not below"):
        stream(env, dp_rank=2, dp_size=2)
    with pytest.raises(UserError, match="weight=-1 is invalid"):
        stream(env, files={"a": {"path": [str(env["root"] / "corpus.txt")], "weight": -1}})
    with pytest.raises(UserError, match="unknown key data.train.a.wieght"):
        stream(env, files={"a": {"path": [str(env["root"] / "corpus.txt")], "wieght": 1}})
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage\n\n\xc3\x28")
    with pytest.raises(UserError, match="binary.txt: not UTF-8 text near byte 0") as exc:
        take(stream(env, files=str(binary), num_workers=1), 1)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="set data.format=auto"):
        stream(env, files=env["tokens"]["gpt"], fmt="text")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n\n")
    for workers in (0, 2):
        with pytest.raises(UserError, match="has no documents") as exc:
            take(stream(env, files=str(empty), num_workers=workers, streams=3), 1)
        assert "\n" not in str(exc.value)


def test_resume_refuses_a_changed_order(env, tmp_path):
    s = stream(env, shuffle=True, streams=2, block=4)
    take(s, 2)
    state = json.loads(json.dumps(merge_states([s.state_dict()])))
    for change, message in (
        ({"streams": 4}, "data.streams was 2 when the checkpoint was written and is 4 now"),
        ({"seed": 1}, "run.seed was 1234"),
        ({"shuffle": False}, "data.shuffle was True"),
        ({"seq_len": 8}, "data.seq_len was 16"),
    ):
        with pytest.raises(UserError, match=message):
            stream(env, **{"shuffle": True, "streams": 2, "block": 4, **change}, state=state)
    grown = tmp_path / "corpus.txt"
    grown.write_text((env["root"] / "corpus.txt").read_text() + "\n\nOne more paragraph.\n")
    with pytest.raises(UserError, match="data source 'train' changed since the checkpoint"):
        stream(env, files=str(grown), shuffle=True, streams=2, block=4, state=state)
    with pytest.raises(UserError, match="earlier version of the data pipeline"):
        stream(env, state={"next_sample": 8, "epoch": 0, "doc": 3, "offset": 0})
    np.testing.assert_equal(state["next_sample"], 8)


def test_a_script_that_never_closes_its_stream_still_exits(env):
    """Data workers ignore SIGTERM (the trainer must outlive the signal to checkpoint), so multiprocessing's exit
    handler could not end them: streams left open are closed at exit, and the process ends."""
    script = (
        "import sys\n"
        "from trainer.data import build_stream\n"
        "s = build_stream(sys.argv[1:2], tokenizer_path=sys.argv[2], objective='causal', seq_len=16, seed=0, dp_rank=0, "
        "dp_size=1, micro_batch=8, num_workers=2, streams=4, block=64)\n"
        "next(s)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(env["root"] / "prose.txt"), env["tok"]["gpt"]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_workers_pace_their_read_ahead_and_stop_waiting_when_closed(env):
    """All streams' blocks fall due together; a worker builds the first block of every stream at once, and a stream's
    next block only once the training process is a share of the way through the current one (staggered over the
    worker's streams); a worker waiting for that stops at once when the stream is closed."""
    streams, block = 4, 16
    span = streams * block  # global samples between two blocks of one stream
    s = stream(env, shuffle=True, streams=streams, block=block, micro_batch=1, num_workers=1)
    feed = s.feed
    received, fetch = [], feed.next_block

    def record(key, index):
        b = fetch(key, index)
        received.append((key[1], index, feed._feed.pace.position(), b.built_at))  # (the sample that needs it)
        return b

    feed.next_block = record
    s.start()
    time.sleep(1)  # the workers read the first block of every stream at once, before any is needed
    batches = []
    for _ in range(3 * span):
        batches.append(next(s))
        time.sleep(0.005)  # slower than the worker: built unpaced, a round's blocks would be built at once
    assert [(st, i) for st, i, _, _ in received] == [(st, i) for i in range(3) for st in range(streams)]
    for st, index, due, built_at in received:
        if index == 0:
            assert built_at == 0, f"stream {st}: the first block waited for sample {built_at}"
            continue
        release = due - span + int(span * (st + 1) / (2 * (streams + 1)))
        assert built_at >= release, f"stream {st} block {index}: built at sample {built_at}, before {release}"
    assert_same_batches(batches, take(stream(env, shuffle=True, streams=streams, block=block, micro_batch=1), 3 * span))

    # the worker now waits to build round 3; closing the stream ends that wait, and so does dropping it unclosed
    (worker,) = s.feed._items._workers
    began = time.monotonic()
    s.close()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - began < 3
    s = stream(env, shuffle=True, streams=streams, block=block, micro_batch=1, num_workers=1)
    take(s, span + 1)
    time.sleep(0.5)  # the worker catches up and waits to build the first block of the next round
    (worker,) = s.feed._items._workers
    began = time.monotonic()
    del s
    gc.collect()
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - began < 3


def test_skipped_lines_are_reported_by_whichever_worker_reads_them(env, tmp_path, capfd):
    """Each DataLoader worker reads only its own streams' units: a file read by worker 1 alone is reported too."""
    good = [json.dumps({"text": p}) for p in env["paragraphs"][:6]]
    clean_a, clean_b, bad_b = tmp_path / "a.jsonl", tmp_path / "clean" / "b.jsonl", tmp_path / "b.jsonl"
    clean_b.parent.mkdir()
    clean_a.write_text("\n".join(good[:3]) + "\n")
    clean_b.write_text("\n".join(good[3:]) + "\n")
    bad_b.write_text("\n".join(good[3:4] + ['{"body": 1}', "{cut", *good[4:]]) + "\n")
    assert all(p.stat().st_size <= 1024 for p in (clean_a, bad_b))  # one unit each (MIN_UNIT_BYTES)
    kw = {"streams": 2, "shuffle": False}  # stream 0 reads a.jsonl only, stream 1 b.jsonl only
    expected = take(stream(env, files=[str(clean_a), str(clean_b)], **kw), 8)
    capfd.readouterr()
    got = stream(env, files=[str(clean_a), str(bad_b)], num_workers=2, **kw)  # worker w builds stream w
    assert [Path(u.file).name for u in got.plans[0].units] == ["a.jsonl", "b.jsonl"]
    assert_same_batches(expected, take(got, 8))
    got.close()
    summaries = [line for line in capfd.readouterr().err.splitlines() if "skipped" in line]
    settings = "(data.text_field=text, data.bad_lines=skip)"
    assert summaries == [
        f"warning: {bad_b}: skipped 1 line without a string 'text' field and 1 line of invalid JSON {settings}"
    ]
