"""How long `trainer plan` takes to search the layouts of large models on many GPUs: Llama 3 8B, 70B and Llama 3.1 405B
given by their dimensions (seq 4096, bf16, micro_batch 1 x grad_accum 8 per data-parallel rank), each planned by the
real command in a fresh process (imports and the meta-device model build included).

    python bench/plan_speed.py                 # about 2 minutes on 2 cores
    python bench/plan_speed.py 70b@64          # one row

Prints one Markdown table: layouts weighed, wall-clock seconds and CPU seconds of the process (on a shared machine
the wall clock also counts other processes' turns; CPU seconds do not), and the layout ranked first. No test asserts
these figures (tests/test_plan.py only guards 70B on 64 GPUs under 60 s); they go in the docs.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LLAMA = {  # (n_layer, d_model, n_head, n_kv_heads, d_ff), vocab 128256
    "8b": (32, 4096, 32, 8, 14336),
    "70b": (80, 8192, 64, 8, 28672),
    "405b": (126, 16384, 128, 8, 53248),
}
CASES = [("8b", 8), ("70b", 8), ("70b", 64), ("70b", 512), ("405b", 1024)]


def config(size: str, folder: Path) -> Path:
    n_layer, d_model, n_head, n_kv, d_ff = LLAMA[size]
    cfg = {
        "model": {
            "arch": "llama",
            "n_layer": n_layer,
            "d_model": d_model,
            "n_head": n_head,
            "n_kv_heads": n_kv,
            "d_ff": d_ff,
            "vocab_size": 128256,
            "max_seq_len": 4096,
        },
        "data": {"train": ["unused.txt"], "tokenizer": "unused.json", "seq_len": 4096},
        "train": {"micro_batch": 1, "grad_accum": 8, "precision": "bf16"},
    }
    path = folder / f"llama-{size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def plan(path: Path, gpus: int) -> dict:
    """One `trainer plan --json` in a fresh process: its wall and CPU seconds, layouts and the first one."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "plan", str(path), "--gpus", str(gpus), "--json"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    out = json.loads(proc.stdout)
    fits = [c for c in out["candidates"] if c["fits"]]
    first = fits[0] if fits else None
    return {
        "layouts": len(out["candidates"]),
        "fit": len(fits),
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "first": describe(first) if first else "nothing fits",
    }


def describe(c: dict) -> str:
    zero = f" ZeRO-{c['zero_stage']}" if c["zero_stage"] else ""
    off = " +offload" if c["offload"] != "none" else ""
    pp = f" pp{c['pp']} {c['pp_schedule']}" if c["pp"] > 1 else ""
    cp = f" cp{c['cp']}" if c["cp"] > 1 else ""
    return (
        f"{c['engine']}{zero}{off} dp{c['dp']}{cp} tp{c['tp']}{pp}, AC {c['activation_checkpointing']}, "
        f"{c['micro_batch']} x {c['grad_accum']}"
    )


def main() -> None:
    wanted = sys.argv[1:]
    cases = [(s, g) for s, g in CASES if not wanted or f"{s}@{g}" in wanted]
    print(f"`trainer plan` search time, {datetime.date.today()}, {os.cpu_count()} CPU cores\n")
    print("| model | GPUs | layouts (fit) | wall s | CPU s | ranked first |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size, gpus in cases:
            row = plan(config(size, Path(tmp)), gpus)
            print(
                f"| Llama {size.upper()} | {gpus:,} | {row['layouts']:,} ({row['fit']:,}) | {row['wall_s']:.1f} | "
                f"{row['cpu_s']:.1f} | {row['first']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
