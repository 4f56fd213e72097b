"""Data pipeline benchmark: prepare, per-rank streaming, shuffled start-up and data wait, each measured beside its
reference in one run (this machine's absolute speed drifts by 10% or more; the targets are ratios).

1. `trainer prepare` tokens/s beside bare `tokenizers` (encode_batch and encode_batch_fast over the same documents,
   already in memory, in chunks of 2048, on the same cores; the faster is the baseline), interleaved repetitions,
   median ratio. Corpus: tiny Shakespeare paragraphs repeated with small variations as jsonl (~20 MB; --quick ~4 MB),
   a bpe tokenizer of vocab 4096 trained on it.
2. Streaming raw jsonl, tokens/s each rank delivers at dp 1 and at dp 2 (both ranks at once, as two processes; one
   tokenizing thread per rank, num_workers=0, shuffle on, seq 512, micro_batch 8), over the same global samples, and
   the tokens each rank tokenized: at dp 2 a rank reads and tokenizes only its own streams.
3. Start-up of a shuffled prepared corpus (>= 100M tokens; --quick ~20M): build_stream to the first micro-batch with
   shuffle on beside shuffle off, and the time to map 1M sample indices through the epoch permutation.
4. The data-wait share of step time of `trainer train configs/demo.yaml` (streaming, 1 tokenizing worker), a short
   run read back from its metrics.jsonl.

    python bench/data.py            # about 2.5 minutes on 2 cores
    python bench/data.py --quick    # smaller corpora and runs: under a minute

It prints a markdown table: figure, value, target, ok.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.data import build_stream, parse_sources, prepare
from trainer.data.logical_streams import StreamReader
from trainer.data.order import Permutation, derive_key
from trainer.tokenizer import load_tokenizer, train_tokenizer

SHAKESPEARE = REPO / "data" / "shakespeare" / "train.txt"
MiB = 2**20
BARE_CHUNK = 2048  # documents per bare encode call (prepare's own chunk size)
SIZES = {
    "full": {
        "corpus_mib": 20,
        "rounds": 3,  # interleaved repetitions of rows 1 and 2
        "streams": 64,  # data.streams (the default)
        "big_tokens": 100_000_000,
        "starts": 5,
        "train_steps": 60,
    },
    "quick": {
        "corpus_mib": 4,
        "rounds": 2,
        "streams": 16,
        "big_tokens": 20_000_000,
        "starts": 3,
        "train_steps": 20,
    },
}
SEQ, MICRO_BATCH, BLOCK = 512, 8, 128  # rows 2 and 3
SKIP_STEPS = 5  # row 4: the first steps include start-up (the worker tokenizes the first blocks)


# ------------------------------------------------------------------------------------------------------- inputs


def paragraphs() -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def write_corpus(path: Path, target_bytes: int, seed: int) -> int:
    """jsonl of tiny Shakespeare paragraphs, each pass in a new order, each paragraph with one word swapped for
    another word of the corpus (so copies are alike, not identical); returns the documents written."""
    paras = paragraphs()
    words = sorted({w for p in paras for w in p.split()})
    rng = random.Random(seed)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            order = list(range(len(paras)))
            rng.shuffle(order)
            for i in order:
                lines = paras[i].split("\n")
                k = rng.randrange(len(lines))
                line_words = lines[k].split(" ")
                line_words[rng.randrange(len(line_words))] = rng.choice(words)
                lines[k] = " ".join(line_words)
                record = json.dumps({"text": "\n".join(lines)}) + "\n"  # ASCII: characters = bytes
                f.write(record)
                written += len(record)
                docs += 1
                if written >= target_bytes:
                    break
    return docs


def read_documents(path: Path) -> list[str]:
    """The documents prepare reads from a jsonl file (stripped, non-empty)."""
    with open(path, encoding="utf-8") as f:
        return [t for line in f if line.strip() and (t := json.loads(line)["text"].strip())]


# ---------------------------------------------------------------------------------------------------- 1. prepare


def time_prepare(corpus: Path, tok: Path, out: Path) -> tuple[float, int]:
    """Seconds of `prepare` into a fresh directory and the content tokens it wrote (separators not counted)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    meta = prepare(parse_sources([str(corpus)])[0], tok, "gpt", out)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds, meta["n_tokens"] - meta["n_docs"]


def time_bare(tokenizer: tokenizers.Tokenizer, docs: list[str], method: str) -> tuple[float, int]:
    """Seconds of the bare tokenizers call over the documents (in memory) and the tokens it produced."""
    encode = getattr(tokenizer, method)
    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(docs), BARE_CHUNK):
        n += sum(len(e) for e in encode(docs[i : i + BARE_CHUNK], add_special_tokens=False))
    return time.perf_counter() - t0, n


def bench_prepare(corpus: Path, tok: Path, work: Path, rounds: int) -> dict:
    docs = read_documents(corpus)
    tokenizer = load_tokenizer(tok).tokenizer
    rates: dict[str, list[float]] = {"prepare": [], "encode_batch": [], "encode_batch_fast": []}
    counts = {}
    for r in range(rounds):
        print(f"  prepare vs bare encode, round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
        for name, measured in rates.items():
            if name == "prepare":
                seconds, n = time_prepare(corpus, tok, work / "prepared")
            else:
                seconds, n = time_bare(tokenizer, docs, name)
            measured.append(n / seconds)
            counts[name] = n
    if len(set(counts.values())) != 1:
        raise SystemExit(f"prepare and the bare encoders counted different tokens: {counts}")
    baseline = max(("encode_batch", "encode_batch_fast"), key=lambda m: statistics.median(rates[m]))
    ratios = [p / b for p, b in zip(rates["prepare"], rates[baseline])]
    return {
        "tokens": counts["prepare"],
        "docs": len(docs),
        "median": {k: statistics.median(v) for k, v in rates.items()},
        "baseline": baseline,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


# ------------------------------------------------------------------------------------------------ 2. streaming


def rank_worker(args: dict, barrier, results) -> None:
    """One data-parallel rank: its stream alone (one thread), timed from build_stream to its last micro-batch."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizing thread per rank: the rank's own work
    torch.set_num_threads(1)
    tokenized = [0]
    encode = StreamReader._encode

    def counting(self, k, batch):  # every document this rank tokenizes passes here
        for item in encode(self, k, batch):
            tokenized[0] += len(item[2]) - 1  # its content tokens (the reader appends the separator)
            yield item

    StreamReader._encode = counting
    barrier.wait()
    t0 = time.perf_counter()
    stream = build_stream(
        [args["corpus"]],
        tokenizer_path=args["tok"],
        objective="causal",
        seq_len=SEQ,
        seed=0,
        dp_rank=args["rank"],
        dp_size=args["dp"],
        micro_batch=MICRO_BATCH,
        shuffle=True,
        streams=args["streams"],
        block=BLOCK,
        num_workers=0,
    )
    for _ in range(args["batches"]):
        next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    delivered = args["batches"] * MICRO_BATCH * SEQ
    results.put({"rank": args["rank"], "rate": delivered / seconds, "tokenized": tokenized[0], "seconds": seconds})


def run_ranks(corpus: Path, tok: Path, dp: int, streams: int, global_samples: int) -> list[dict]:
    """dp ranks at once (fresh processes, started together) over the same `global_samples` global samples."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(dp), ctx.Queue()
    batches = global_samples // (dp * MICRO_BATCH)
    procs = []
    for rank in range(dp):
        args = {"corpus": str(corpus), "tok": str(tok), "rank": rank, "dp": dp, "streams": streams}
        procs.append(ctx.Process(target=rank_worker, args=({**args, "batches": batches}, barrier, results)))
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a rank process failed (exit {p.exitcode})")
    return sorted(out, key=lambda r: r["rank"])


def bench_streaming(corpus: Path, tok: Path, streams: int, rounds: int) -> dict:
    # One pass over every stream's first block: L x block global samples, so both layouts read whole blocks only.
    global_samples = streams * BLOCK
    runs: dict[int, list[list[dict]]] = {1: [], 2: []}
    for r in range(rounds):
        for dp in (1, 2):
            print(f"  streaming dp={dp}, round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
            runs[dp].append(run_ranks(corpus, tok, dp, streams, global_samples))
    per_rank = {dp: [statistics.mean(x["rate"] for x in ranks) for ranks in runs[dp]] for dp in runs}
    return {
        "global_samples": global_samples,
        "rate": {dp: statistics.median(v) for dp, v in per_rank.items()},
        "slowest_dp2": statistics.median(min(x["rate"] for x in ranks) for ranks in runs[2]),
        "ratios": [b / a for a, b in zip(per_rank[1], per_rank[2])],
        "tokenized": {dp: statistics.median(x["tokenized"] for ranks in runs[dp] for x in ranks) for dp in runs},
    }


# --------------------------------------------------------------------------------------------- 3. shuffled start


def first_batch_seconds(prepared: Path, tok: Path, shuffle: bool) -> float:
    t0 = time.perf_counter()
    stream = build_stream(
        [str(prepared)],
        tokenizer_path=tok,
        objective="causal",
        seq_len=SEQ,
        seed=0,
        dp_rank=0,
        dp_size=1,
        micro_batch=MICRO_BATCH,
        shuffle=shuffle,
        num_workers=0,
    )
    next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    return seconds


def bench_start(work: Path, tok: Path, bytes_per_token: float, big_tokens: int, starts: int) -> dict:
    corpus_dir = work / "big"
    corpus_dir.mkdir()
    total = int(big_tokens * bytes_per_token * 1.05)  # 5% margin over the measured bytes per token
    files = max(1, -(-total // (64 * MiB)))
    print(f"  writing {total / MiB:,.0f} MiB of jsonl in {files} file(s) ...", file=sys.stderr, flush=True)
    for k in range(files):
        write_corpus(corpus_dir / f"part_{k:03d}.jsonl", total // files, seed=100 + k)
    print("  preparing it ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    meta = prepare(parse_sources([str(corpus_dir)])[0], tok, "gpt", work / "big_prepared")
    prepare_s = time.perf_counter() - t0
    shutil.rmtree(corpus_dir)
    prepared = work / "big_prepared"
    for shuffle in (True, False):  # warm-up: imports and first page faults are not the shuffle's
        first_batch_seconds(prepared, tok, shuffle)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(starts):
        for shuffle in (True, False):
            times[shuffle].append(first_batch_seconds(prepared, tok, shuffle))
    per_epoch = (meta["n_tokens"] - 1) // SEQ  # GPT windows of one epoch (what PreparedSampler shuffles)
    perm_times = []
    for _ in range(starts):
        t0 = time.perf_counter()
        perm = Permutation(per_epoch, derive_key(0, meta["fingerprint"], "epoch", 0))
        mapped = perm[np.arange(1_000_000, dtype=np.int64) % per_epoch]
        perm_times.append(time.perf_counter() - t0)
    if mapped.min() < 0 or mapped.max() >= per_epoch:
        raise SystemExit("the permutation left its range")
    return {
        "tokens": meta["n_tokens"],
        "prepare_s": prepare_s,
        "per_epoch": per_epoch,
        "shuffled": statistics.median(times[True]),
        "sequential": statistics.median(times[False]),
        "ratio": statistics.median(a / b for a, b in zip(times[True], times[False])),
        "perm_1m": statistics.median(perm_times),
    }


# ------------------------------------------------------------------------------------------------ 4. data wait


def bench_training(work: Path, steps: int) -> dict:
    """`trainer train configs/demo.yaml` for a short run (the demo's own tokenizer recipe, from the Makefile)."""
    tok = train_tokenizer("bpe", 2048, [str(SHAKESPEARE)], work / "demo_tok")
    run_dir = work / "demo_run"
    overrides = [
        f"run.dir={run_dir}",
        f"data.tokenizer={tok}",
        f"train.steps={steps}",
        "train.eval_every=0",
        "checkpoint.every=0",
        "checkpoint.resume=never",
        "log.every=1",
        "log.wandb.mode=disabled",
    ]
    cmd = [sys.executable, "-m", "trainer", "train", "configs/demo.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"trainer train failed (exit {proc.returncode})")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step_lines = [m for m in lines if "data_wait_s" in m]
    if len(step_lines) != steps:
        raise SystemExit(f"expected {steps} step lines in metrics.jsonl, found {len(step_lines)}")
    measured = step_lines[SKIP_STEPS:]
    return {
        "share": sum(m["data_wait_s"] for m in measured) / sum(m["step_time_s"] for m in measured),
        "share_all": sum(m["data_wait_s"] for m in step_lines) / sum(m["step_time_s"] for m in step_lines),
        "steps": steps,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in measured),
    }


# ------------------------------------------------------------------------------------------------------ report


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def verdict(ok: bool | None) -> str:
    return "info" if ok is None else ("ok" if ok else "**NOT OK**")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller corpora and shorter runs (under a minute)")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {cpu_model()}, {os.cpu_count()} CPUs, {gpu} | torch "
        f"{torch.__version__}, tokenizers {tokenizers.__version__} | bench/data.py{' --quick' if args.quick else ''}"
    )
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.jsonl"
        docs = write_corpus(corpus, size["corpus_mib"] * MiB, seed=0)
        print(f"  corpus: {docs:,} documents, training the tokenizer ...", file=sys.stderr, flush=True)
        tok = train_tokenizer("bpe", 4096, [str(corpus)], work / "tok")

        pr = bench_prepare(corpus, tok, work, size["rounds"])
        rows.append(
            (
                f"1. prepare tokens/s ({corpus.stat().st_size / MiB:.0f} MiB jsonl, {pr['tokens'] / 1e6:.1f}M tokens)",
                f"{pr['median']['prepare']:,.0f}",
                "",
                None,
            )
        )
        rows.append(
            (
                "1. bare tokenizers tokens/s: encode_batch / encode_batch_fast (chunks of 2048 docs)",
                f"{pr['median']['encode_batch']:,.0f} / {pr['median']['encode_batch_fast']:,.0f}",
                "",
                None,
            )
        )
        rows.append(
            (
                f"1. prepare / bare {pr['baseline']} (median of {len(pr['ratios'])} interleaved ratios)",
                f"{pr['ratio']:.2f}x ({', '.join(f'{r:.2f}' for r in pr['ratios'])})",
                ">= 0.8x",
                pr["ratio"] >= 0.8,
            )
        )

        st = bench_streaming(corpus, tok, size["streams"], size["rounds"])
        label = f"L={size['streams']}, {st['global_samples']:,} global samples of {SEQ}"
        rows.append((f"2. streaming tokens/s per rank, dp 1 ({label})", f"{st['rate'][1]:,.0f}", "", None))
        rows.append(
            (
                "2. streaming tokens/s per rank, dp 2 (two processes at once; slower rank)",
                f"{st['rate'][2]:,.0f} ({st['slowest_dp2']:,.0f})",
                "",
                None,
            )
        )
        ratio = statistics.median(st["ratios"])
        rows.append(
            (
                "2. per-rank rate dp 2 / dp 1 (median of the rounds' ratios)",
                f"{ratio:.2f}x ({', '.join(f'{r:.2f}' for r in st['ratios'])})",
                ">= 0.9x (no fall)",
                ratio >= 0.9,
            )
        )
        half = st["tokenized"][2] / st["tokenized"][1]
        rows.append(
            (
                "2. tokens tokenized per rank, dp 1 / dp 2 (dp 2 / dp 1)",
                f"{st['tokenized'][1]:,.0f} / {st['tokenized'][2]:,.0f} ({half:.2f}x)",
                "about 0.5x",
                0.45 <= half <= 0.55,
            )
        )

        bytes_per_token = corpus.stat().st_size / pr["tokens"]
        sh = bench_start(work, tok, bytes_per_token, size["big_tokens"], size["starts"])
        rows.append(
            (
                f"3. prepared corpus: tokens (prepare took {sh['prepare_s']:.0f} s)",
                f"{sh['tokens']:,}",
                f">= {size['big_tokens'] / 1e6:.0f}M",
                sh["tokens"] >= size["big_tokens"],
            )
        )
        rows.append(("3. build_stream to first micro-batch, shuffle on", f"{1000 * sh['shuffled']:.1f} ms", "", None))
        rows.append(("3. the same, shuffle off", f"{1000 * sh['sequential']:.1f} ms", "", None))
        rows.append(("3. start-up shuffle on / off", f"{sh['ratio']:.2f}x", "<= 1.2x", sh["ratio"] <= 1.2))
        rows.append(
            (
                f"3. map 1M sample indices through the epoch permutation ({sh['per_epoch']:,} samples/epoch)",
                f"{1000 * sh['perm_1m']:.0f} ms",
                "",
                None,
            )
        )

        tr = bench_training(work, size["train_steps"])
        rows.append(
            (
                f"4. data wait / step time, demo config, steps {SKIP_STEPS + 1}-{tr['steps']}",
                f"{100 * tr['share']:.2f}%",
                "<= 1%",
                tr["share"] <= 0.01,
            )
        )
        rows.append(
            (
                f"4. the same over all {tr['steps']} steps (start-up included; {tr['tokens_per_s']:,.0f} tokens/s)",
                f"{100 * tr['share_all']:.2f}%",
                "",
                None,
            )
        )

    print("\n| figure | value | target | ok |\n| --- | ---: | --- | --- |")
    for figure, value, target, ok in rows:
        print(f"| {figure} | {value} | {target or '-'} | {verdict(ok) if target else 'info'} |")
    print(
        f"\nRow 2: one tokenizing thread per rank (TOKENIZERS_PARALLELISM=false, num_workers=0), shuffle on, "
        f"micro_batch {MICRO_BATCH}, data.shuffle_block {BLOCK}; each rate is tokens delivered / seconds from "
        f"build_stream to the last micro-batch, medians of {size['rounds']} interleaved rounds. Rows 1-3 use a bpe "
        f"tokenizer of vocab 4096; row 4 the demo's (vocab 2048). Total {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
