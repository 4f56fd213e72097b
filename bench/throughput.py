"""Throughput benchmark: the project's training loop beside a bare PyTorch loop over the same model.

For each model it prints tokens/s, MFU and the share of step time spent waiting for data. The bare loop (random
token ids already in memory, forward, loss, backward, AdamW step) is the floor the project's loop should approach:
the difference is what streaming, logging, the global-batch loss normalisation and the engine cost.

    python bench/throughput.py                 # demo config dims and gpt2-small dims, fp32 on this machine
    python bench/throughput.py --only demo --steps 40

It ends with the data pipeline alone: the tokens/s streaming text (per worker count) and prepared shards deliver.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import load_config
from trainer.data import build_stream, parse_sources, prepare
from trainer.metrics import flops_per_token, mfu, peak_flops
from trainer.models import build_model, count_params
from trainer.optim import build_optimizer
from trainer.tokenizer import train_tokenizer
from trainer.train import train

CASES = {
    # name: (model overrides, seq_len, micro_batch, steps)
    "demo": ({"preset": "gpt-mini", "max_seq_len": 128}, 128, 16, 60),
    "gpt2-small": ({"preset": "gpt2-small", "vocab_size": 50257}, 256, 2, 6),
}


def bare_loop(model_dims: dict, vocab: int, seq_len: int, micro_batch: int, steps: int, warmup: int = 2) -> float:
    """Tokens/s of forward + backward + AdamW on in-memory random ids: no data pipeline, no logging."""
    torch.manual_seed(0)
    dims = {k: v for k, v in model_dims.items() if k != "preset"}
    dims.setdefault("vocab_size", vocab)
    model = build_model("gpt", model_dims.get("preset"), **dims)
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)
    ids = torch.randint(0, model.config.vocab_size, (steps + warmup, micro_batch, seq_len + 1))
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = ids[i, :, :-1], ids[i, :, 1:]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * micro_batch * seq_len / (time.perf_counter() - t0)


def project_loop(work: Path, tokenizer: Path, model_dims: dict, seq_len: int, micro_batch: int, steps: int) -> dict:
    """Runs `trainer train` in this process on the bundled corpus and reads back its metrics."""
    cfg = {
        "run": {"name": "bench", "dir": str(work / "run"), "seed": 0},
        "model": {"arch": "gpt", **model_dims},
        "data": {
            "train": [str(REPO / "data" / "shakespeare" / "train.txt")],
            "format": "text",
            "tokenizer": str(tokenizer),
            "seq_len": seq_len,
            "num_workers": 1,
        },
        "train": {"steps": steps, "micro_batch": micro_batch, "warmup_steps": 1, "eval_every": 0},
        "checkpoint": {"every": 0, "keep": 1, "resume": "never"},
        "log": {"every": 1, "wandb": {"mode": "disabled"}},
    }
    (work / "bench.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(work / "bench.yaml"))
    lines = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_ = [m for m in lines if "tokens_per_s" in m][2:]  # the first steps include worker start-up
    total = sum(m["step_time_s"] for m in steps_)
    return {
        "tokens_per_s": sum(m["tokens_per_s"] * m["step_time_s"] for m in steps_) / total,
        "data_wait_share": sum(m["data_wait_s"] for m in steps_) / total,
        "flops_per_token": lines[0]["flops_per_token"],
        "peak_flops": lines[0]["peak_flops"],
    }


def data_rate(tokenizer: Path, fmt: str, files: list[str], num_workers: int, batches: int = 300) -> float:
    """Tokens/s the data pipeline alone delivers to one rank (seq 128, micro_batch 16), after its start-up."""
    stream = build_stream(
        files,
        fmt=fmt,
        text_field="text",
        tokenizer_path=tokenizer,
        arch="gpt",
        seq_len=128,
        seed=0,
        dp_rank=0,
        dp_size=1,
        micro_batch=16,
        num_workers=num_workers,
    )
    for _ in range(5):
        next(stream)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * 16 * 128 / (time.perf_counter() - t0)
    stream.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(CASES), action="append")
    p.add_argument("--steps", type=int, help="override the steps of every case")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"peak {peak / 1e9:.1f} GFLOP/s fp32 ({source})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer("bpe", 2048, [str(REPO / "data" / "shakespeare" / "train.txt")], Path(tmp) / "tok")
        print(f"{'case':<12} {'loop':<8} {'tokens/s':>10} {'MFU':>7} {'data wait':>10}")
        for name in args.only or list(CASES):
            dims, seq_len, micro_batch, steps = CASES[name]
            steps = args.steps or steps
            work = Path(tmp) / name
            work.mkdir()
            ours = project_loop(work, tok, dims, seq_len, micro_batch, steps)
            bare = bare_loop(dims, 2048, seq_len, micro_batch, max(3, steps // 3))
            with torch.device("meta"):
                model_dims = {k: v for k, v in dims.items() if k != "preset"}
                model = build_model("gpt", dims.get("preset"), **{"vocab_size": 2048, **model_dims})
            fpt = flops_per_token(
                count_params(model, exclude_embeddings=True),
                model.config.n_layer,
                model.config.d_model,
                seq_len,
                causal=True,
                vocab_size=model.config.vocab_size,
            )
            print(
                f"{name:<12} {'trainer':<8} {ours['tokens_per_s']:>10,.0f} "
                f"{100 * mfu(ours['tokens_per_s'], ours['flops_per_token'], ours['peak_flops']):>6.1f}% "
                f"{100 * ours['data_wait_share']:>9.1f}%"
            )
            print(f"{name:<12} {'bare':<8} {bare:>10,.0f} {100 * mfu(bare, fpt, peak):>6.1f}% {'-':>10}")
        corpus = [str(REPO / "data" / "shakespeare" / "train.txt")]
        prepare(parse_sources(corpus)[0], tok, "gpt", Path(tmp) / "shards")
        print("data pipeline alone (one rank, GPT, seq 128):")
        for label, fmt, files, workers in (
            ("streaming text, 1 worker", "text", corpus, 1),
            ("streaming text, 2 workers", "text", corpus, 2),
            ("prepared token shards", "tokens", [str(Path(tmp) / "shards")], 0),
        ):
            print(f"  {label:<28} {data_rate(tok, fmt, files, workers):>12,.0f} tokens/s")


if __name__ == "__main__":
    main()
