"""What the layout tables share: the single-process reference each layout is held to, the runner that starts every
layout of one world size in one launch, and the comparisons.

All runs share one tiny model and one global batch (4 samples x 32 tokens), fp32, dropout 0, so the single-process run
is the exact reference: per-step loss and grad norm within 1e-4 (relative), final weights within 1e-5.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import torch
from conftest import read_metrics, run_cli, run_in_turn, tiny_config, write_config

from trainer.checkpoint import load_model

STEPS = 12
BASE = {
    "train.steps": STEPS,
    "train.warmup_steps": 3,
    "train.eval_every": 6,
    "train.sample_tokens": 8,
    "checkpoint.every": 0,
    "data.num_workers": 0,
}

# GQA (4 query heads over 2 key/value heads, so tp 2 keeps whole groups), untied head, QK-norm (Qwen3)
LLAMA = {"model.arch": "llama", "model.n_head": 4, "model.n_kv_heads": 2, "model.qk_norm": True}
# pipeline stages: 4 micro-batches of 1, the same global batch as the single-process run's 4 samples
PP = {"parallel.pp": 2, "train.micro_batch": 1, "train.grad_accum": 4}


def launch(nproc: int, config: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`launch local` (torchrun underneath), as a user starts a multi-rank run."""
    return run_cli("launch", "local", "--nproc-per-node", str(nproc), "--", str(config), timeout=timeout)


def step_records(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "loss" in m and "event" not in m}


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    """The key projection's bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so AdamW
    moves it by rounding noise alone, about lr per step in either direction: it is held to that bound instead."""
    wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        if name.endswith("attn.wk.bias"):
            assert wa[name].abs().max() < 0.05 and wb[name].abs().max() < 0.05, name
            continue
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol, msg=name)


def assert_matches(reference: Path, run: Path, rtol: float = 1e-4, weights_atol: float = 1e-5) -> None:
    ref, got = step_records(reference), step_records(run)
    assert ref.keys() == got.keys()
    for step in ref:
        for key in ("loss", "grad_norm", "lr"):
            assert math.isclose(got[step][key], ref[step][key], rel_tol=rtol), (step, key, got[step], ref[step])
    val = [[m["val_loss"] for m in read_metrics(d) if "val_loss" in m] for d in (reference, run)]
    assert len(val[0]) == 2 and all(math.isclose(a, b, rel_tol=rtol) for a, b in zip(*val)), val
    assert_same_weights(reference, run, weights_atol)


def layout_runner(root: Path, corpus: Path, tokenizer: Path, layouts: dict, **model):
    """`get(name)`: the run of layout `name` (ranks, overrides); "single" is the 1-process reference. The first
    layout asked for at a world size runs every layout of the table at that size, in turn, in one launch."""
    done: dict[str, Path] = {}

    def config(name: str) -> Path:
        overrides = layouts.get(name, (1, {}))[1]
        cfg = tiny_config(root / name, corpus, tokenizer, **{**BASE, **model, **overrides})
        return write_config(cfg, root / f"{name}.yaml")

    def get(name: str) -> Path:
        if name not in done:
            nproc = layouts.get(name, (1, {}))[0]
            if nproc == 1:
                r = run_cli("trainer", "train", str(config(name)), env={"OMP_NUM_THREADS": "1"})
                assert r.returncode == 0, r.stderr[-3000:]
                done[name] = root / name
            else:
                batch = [n for n, (p, _) in layouts.items() if p == nproc and n not in done]
                r = run_in_turn(nproc, [config(n) for n in batch])
                assert r.returncode == 0, r.stderr[-3000:]
                done.update({n: root / n for n in batch})
        return done[name]

    return get


def assert_tracks_fp32(reference: Path, run: Path) -> None:
    """Every step's loss near the fp32 run's (a wrong cast or a lost update shows within a few steps) and the grad
    norm within 10% (AdamW hides a gradient scale, a missing fp16 unscale; the logged norm does not)."""
    ref, got = step_records(reference), step_records(run)
    assert ref.keys() == got.keys()
    for step in ref:
        assert abs(got[step]["loss"] - ref[step]["loss"]) < 0.05, (step, got[step]["loss"], ref[step]["loss"])
        assert abs(got[step]["grad_norm"] / ref[step]["grad_norm"] - 1) < 0.1, (step, got[step], ref[step])
    assert ref[STEPS]["loss"] < ref[1]["loss"] - 0.3  # the curve the run must follow moves
