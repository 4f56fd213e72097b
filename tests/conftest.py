"""Shared fixtures: a slice of the bundled corpus and tokenizers trained on it once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare" / "train.txt"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one thread each, for the tests' own torch and for every
    # process they start (set before anything imports torch)
    os.environ["OMP_NUM_THREADS"] = "1"
# the MFU peak of every run the suite starts: each rank would otherwise measure its matmul peak for 0.8 s (some 360
# rank starts: minutes of the suite's CPU); test_metrics and test_gpt_trains_and_writes_artifacts unset it and measure
os.environ.setdefault("TRAINER_PEAK_TFLOPS", "0.1")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a process the suite starts that aborts says where it was
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


QUICK = os.environ.get("TRAINER_TEST_QUICK") == "1"  # `make test-quick`


@pytest.fixture(scope="session", autouse=True)
def quick_mode():
    """Under `make test-quick`, a test that would start a subprocess (a CLI run, torchrun, a data worker) or join a
    process group is skipped at that point, saying so: what is left runs in-process in a few minutes. `make test`
    runs everything."""
    if not QUICK:
        yield
        return
    import multiprocessing

    import torch.distributed as dist

    def refuse(*args, **kwargs):
        pytest.skip("starts a subprocess or a process group: `make test` runs it")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", refuse)
        mp.setattr(multiprocessing.process.BaseProcess, "start", refuse)
        mp.setattr(dist, "init_process_group", refuse)
        yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first ~120 KB of tiny Shakespeare, cut at a paragraph boundary."""
    text = CORPUS.read_text()[:120_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text[: text.rfind("\n\n")] + "\n")
    return path


@pytest.fixture(scope="session")
def gpt_tok(corpus, tmp_path_factory) -> Path:
    from trainer.tokenizer import train_tokenizer

    return train_tokenizer("bpe", 512, [str(corpus)], tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def bert_tok(corpus, tmp_path_factory) -> Path:
    from trainer.tokenizer import train_tokenizer

    return train_tokenizer("wordpiece", 512, [str(corpus)], tmp_path_factory.mktemp("wordpiece"))


def tiny_config(run_dir: Path, corpus: Path, tokenizer: Path, arch: str = "gpt", **overrides) -> dict:
    """A config dict for a model that trains in a second; overrides use dotted keys."""
    cfg = {
        "run": {"name": "test", "dir": str(run_dir), "seed": 7},
        "model": {"arch": arch, "n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 64, "dropout": 0.0},
        "data": {
            "train": [str(corpus)],
            "valid": [str(corpus)],
            "format": "text",
            "tokenizer": str(tokenizer),
            "seq_len": 32,
            "num_workers": 1,
        },
        "train": {
            "steps": 4,
            "micro_batch": 4,
            "grad_accum": 1,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "precision": "fp32",
            "eval_every": 0,
            "eval_steps": 2,
        },
        "parallel": {"engine": "ddp"},
        "checkpoint": {"every": 0, "keep": 2, "resume": "auto"},
        "log": {"every": 1, "wandb": {"mode": "disabled"}},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step; a later (re)start's line for a step replaces an earlier one."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m and "event" not in m}


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def torchrun(nproc: int, config: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`trainer train CONFIG` on `nproc` real gloo ranks under plain torchrun."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        + ["-m", "trainer", "train", str(config), *overrides],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def run_in_turn(nproc: int, configs: list[Path], timeout: int = 300) -> subprocess.CompletedProcess:
    """`trainer train` on each config in turn, inside ONE torchrun launch of `nproc` gloo ranks (tests/layouts_worker.py):
    the process start-up, imports and group rendezvous are paid once for the whole list. `timeout` is per config."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        + [str(REPO / "tests" / "layouts_worker.py"), *map(str, configs)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=timeout * len(configs),
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )


def start_trainer(config: Path, *overrides: str) -> subprocess.Popen:
    """`trainer train CONFIG` in its own process group, which the tests signal as a whole (as Slurm and torchrun do)."""
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", str(config), *overrides],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `proc` has logged `step` (failing with its stderr if it ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if (run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")
