"""kill -9 at random moments of checkpoint writes, then the same command again: does every restart resume from a
complete checkpoint and continue the uninterrupted run's losses?

    python bench/kill_trials.py [--trials 20] [--ranks 1 2] [--seed 0]
    python bench/kill_trials.py --async [--trials 20] [--ranks 2] [--write-s 0.3]

Each trial starts `launch local --nproc-per-node R -- CONFIG` on a tiny GPT that checkpoints every 2 steps, waits for
a checkpoint write to begin (a `.tmp_step_N` directory appears) or for a random moment between steps, and sends
SIGKILL to one process of the job chosen at random: the launcher, the torchrun agent, or a rank. It then checks that
no process of the job is left within 10 s, reruns the same command to the end, and compares every logged loss with an
uninterrupted run of the same command (1e-6 relative). It prints one line per trial and a summary.

With --async the runs set checkpoint.async=true and start under plain torchrun through tests/dcp_faults.py, which
slows each background write by --write-s seconds (torch's FileSystemWriter patched in the rank's process, not the
trainer), so that a kill can land anywhere in it: a trial waits for `.tmp_step_N` to appear and kills the torchrun
agent or a rank after a random delay up to the write's length plus a step. `during_write` then says whether the
write was still unpublished when the kill landed (step_N not yet renamed into place).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 24


def config(run_dir: Path, corpus: Path, tokenizer: Path, background: bool = False) -> dict:
    return {
        "run": {"name": "kill", "dir": str(run_dir), "seed": 7},
        "model": {"arch": "gpt", "n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 64, "dropout": 0.1},
        "data": {
            "train": [str(corpus)],
            "format": "text",
            "tokenizer": str(tokenizer),
            "seq_len": 32,
            "num_workers": 1,
        },
        "train": {"steps": STEPS, "micro_batch": 4, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0},
        "parallel": {"engine": "ddp"},
        "checkpoint": {"every": 2, "keep": 2, "resume": "auto", "async": background},
        "log": {"every": 1, "wandb": {"mode": "disabled"}},
    }


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # the line being written as we read, or one a kill tore (the trainer ends it)
            continue
        if "loss" in m and "event" not in m:
            out[m["step"]] = m["loss"]
    return out


def starts(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m.get("event") == "start"]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


WRITE_S = None  # --async: seconds each background write is slowed by (tests/dcp_faults.py); None: `launch local`


def launch(cfg_path: Path, ranks: int) -> subprocess.Popen:
    if WRITE_S is None:
        cmd = [sys.executable, "-m", "launch", "local", "--nproc-per-node", str(ranks), "--", str(cfg_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd += [str(REPO / "tests" / "dcp_faults.py"), "train", str(cfg_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DCP_FAULT_WRITE_S": str(WRITE_S)}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def trial(n: int, ranks: int, work: Path, corpus: Path, tok: Path, ref: dict[int, float], rng: random.Random) -> dict:
    run_dir = work / f"r{ranks}_t{n}"
    cfg_path = work / f"r{ranks}_t{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(config(run_dir, corpus, tok, background=WRITE_S is not None)))
    ckpts = run_dir / "checkpoints"
    proc = launch(cfg_path, ranks)
    during_write = WRITE_S is not None or rng.random() < 0.75
    delay = rng.uniform(0.0, 0.03) if WRITE_S is None else rng.uniform(0.0, WRITE_S + 0.1)
    kill_step = rng.randrange(3, STEPS - 4)  # between steps: once this step is logged
    deadline = time.monotonic() + 120
    first_save = 4 + rng.randrange(0, STEPS - 8, 2)  # kill at a write of a step in [4, STEPS-4)
    hit = False
    while time.monotonic() < deadline and proc.poll() is None:
        if during_write and (ckpts / f".tmp_step_{first_save}").exists():
            hit = True
            break
        if not during_write and (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= kill_step:
            hit = True
            break
        time.sleep(0.001)
    time.sleep(delay)
    agent = children(proc.pid) if WRITE_S is None else [proc.pid]  # under plain torchrun the job is the agent
    job = [proc.pid, *descendants(proc.pid)]
    rank_pids = [p for a in agent for p in children(a) if "train" in Path(f"/proc/{p}/cmdline").read_text()]
    choices = {"launcher": proc.pid if WRITE_S is None else None, "agent": agent[0] if agent else None}
    choices["rank"] = rng.choice(rank_pids or [None])
    victim = rng.choice([k for k, v in choices.items() if v is not None])
    os.kill(choices[victim], signal.SIGKILL)
    unpublished = WRITE_S is None or not (ckpts / f"step_{first_save}").exists()  # --async: still being written
    proc.wait(timeout=60)
    gone_by = time.monotonic() + 10
    while time.monotonic() < gone_by and any(alive(p) for p in job):
        time.sleep(0.05)
    left = [p for p in job if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    saved = sorted(int(p.name[5:]) for p in ckpts.glob("step_*")) if ckpts.is_dir() else []
    again = launch(cfg_path, ranks)
    _, err = again.communicate(timeout=300)
    result = {
        "ranks": ranks,
        "trial": n,
        "victim": victim,
        "during_write": during_write and hit and unpublished,
        "killed_while_running": hit,
        "left_alive": len(left),
        "restart_exit": again.returncode,
        "resumed_from": starts(run_dir)[-1]["resumed_from_step"] if (run_dir / "metrics.jsonl").exists() else None,
        "checkpoints_at_kill": saved,
    }
    got = losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
    result["losses_equal"] = sorted(got) == sorted(ref) and all(math.isclose(got[s], ref[s], rel_tol=1e-6) for s in ref)
    result["traceback"] = "Traceback" in err
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async", dest="background", action="store_true", help="checkpoint.async=true trials")
    parser.add_argument("--write-s", type=float, default=0.3, help="--async: seconds each background write is slowed")
    args = parser.parse_args()
    global WRITE_S
    WRITE_S = args.write_s if args.background else None
    from trainer.tokenizer import train_tokenizer

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_trials_"))
    corpus = work / "corpus.txt"
    text = (REPO / "data" / "shakespeare" / "train.txt").read_text()[:120_000]
    corpus.write_text(text)
    tok = train_tokenizer("bpe", 512, [str(corpus)], work / "tok")
    results = []
    for ranks in args.ranks:
        ref_cfg = work / f"ref{ranks}.yaml"
        ref_cfg.write_text(yaml.safe_dump(config(work / f"ref{ranks}", corpus, tok)))  # synchronous: the reference
        launch(ref_cfg, ranks).communicate(timeout=300)
        ref = losses(work / f"ref{ranks}")
        for n in range(args.trials):
            r = trial(n, ranks, work, corpus, tok, ref, rng)
            results.append(r)
            print(json.dumps(r), flush=True)
    ok = [
        r
        for r in results
        if r["left_alive"] == 0 and r["restart_exit"] == 0 and r["losses_equal"] and not r["traceback"]
    ]
    for ranks in args.ranks:
        mine = [r for r in results if r["ranks"] == ranks]
        good = [r for r in ok if r["ranks"] == ranks]
        victims = {v: sum(r["victim"] == v for r in mine) for v in ("launcher", "agent", "rank")}
        writes = sum(r["during_write"] for r in mine)
        print(
            f"{ranks} rank(s): {len(good)}/{len(mine)} trials clean (no process left, restart exit 0, every loss equal "
            f"to the uninterrupted run's); victims {victims}; {writes} killed during a checkpoint write",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if len(ok) == len(results) else 1)


if __name__ == "__main__":
    main()
