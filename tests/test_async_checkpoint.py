"""checkpoint.async on 2 real gloo ranks, FSDP ZeRO-3: the background write saves exactly the state of the step it
names, a run resumed from one continues the uninterrupted synchronous run's losses, gradient norms and weights, and
the directory protocol holds through kill -9 during a write, a write that fails on one rank, and SIGTERM while a write
is in flight. Faults are injected by tests/dcp_faults.py (torch's DCP classes patched in the rank's process), never
by hooks in the trainer."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config, write_config

from trainer.checkpoint import complete_checkpoints, load_model, read_pointer
from trainer.integrity import damage

STEPS = 8
EVERY = 2
FAULTS = REPO / "tests" / "dcp_faults.py"
OVER = {
    "train.steps": STEPS,
    "checkpoint.every": EVERY,
    "checkpoint.keep": 10,
    "parallel.engine": "fsdp",
    "parallel.zero_stage": 3,
    "model.dropout": 0.1,  # the RNG streams must continue too
}


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines (one a kill -9 tore is skipped)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def curve(run_dir: Path) -> dict[int, tuple[float, float]]:
    """(loss, grad_norm) by step; a later (re)start's line for a step replaces an earlier one."""
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in records(run_dir) if "loss" in m and "event" not in m}


def resumed_from(run_dir: Path) -> list[int]:
    return [m["resumed_from_step"] for m in records(run_dir) if m.get("event") == "start"]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_model(ckpt).state_dict()


def command(config: Path, *overrides: str) -> list[str]:
    """2 ranks under plain torchrun, each running the trainer's CLI through the fault injector."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] + [
        str(FAULTS),
        "train",
        str(config),
        *overrides,
    ]


def env(**faults: float) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **{f"DCP_FAULT_{k.upper()}": str(v) for k, v in faults.items()}}


def run2(config: Path, *overrides: str, **faults) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(config, *overrides),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=env(**faults),
        check=False,
    )


def start2(config: Path, *overrides: str, **faults) -> subprocess.Popen:
    """The job in its own process group, which the tests signal as a whole."""
    return subprocess.Popen(
        command(config, *overrides),
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env(**faults),
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended before {path.name} appeared: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def assert_same_curve(run_dir: Path, base: dict) -> None:
    got = curve(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, (loss, norm) in base["curve"].items():
        assert got[step][0] == pytest.approx(loss, rel=1e-6, abs=0), f"loss of step {step}"
        assert got[step][1] == pytest.approx(norm, rel=1e-5, abs=1e-7), f"grad_norm of step {step}"


def assert_same_weights(ckpt: Path, expected: dict[str, torch.Tensor]) -> None:
    got = weights(ckpt)
    for name, w in expected.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{ckpt.name} {n}: {m}")


def assert_protocol_holds(ckpts: Path) -> None:
    """No temporary directory left, every step_<N> complete, `latest` names the newest."""
    assert not list(ckpts.glob(".tmp_step_*")), sorted(p.name for p in ckpts.iterdir())
    for p in ckpts.glob("step_*"):
        assert damage(p) is None, (p.name, damage(p))
    assert read_pointer(ckpts)[0] == complete_checkpoints(ckpts)[-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus, gpt_tok) -> dict:
    """The configs, and the uninterrupted synchronous run: its losses, gradient norms and every checkpoint's
    weights."""
    root = tmp_path_factory.mktemp("async")
    sync = write_config(tiny_config(root / "sync", corpus, gpt_tok, **OVER), root / "sync.yaml")
    cfg = tiny_config(root / "unused", corpus, gpt_tok, **OVER, **{"checkpoint.async": True})
    asynchronous = write_config(cfg, root / "async.yaml")
    r = run2(sync)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = root / "sync" / "checkpoints"
    return {
        "root": root,
        "config": asynchronous,
        "curve": curve(root / "sync"),
        "weights": {s: weights(ckpts / f"step_{s}") for s in range(EVERY, STEPS + 1, EVERY)},
    }


@pytest.fixture(scope="module")
def slow_staging_run(setup) -> Path:
    """The async run, every staging copy delayed by 0.5 s: the next step's forward and backward run meanwhile, and
    its optimizer step comes long before the copy would be done without the wait."""
    run_dir = setup["root"] / "slow_staging"
    r = run2(setup["config"], f"run.dir={run_dir}", stage_s=0.5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout.count("(written in the background)") == STEPS // EVERY - 1  # the final save is synchronous
    return run_dir


def test_async_checkpoints_hold_the_weights_of_the_step_they_name(setup, slow_staging_run):
    """Every checkpoint of the async run equals the synchronous run's of the same step: the optimizer step after a
    save waited for the staging copy (without the wait these hold the next step's weights)."""
    ckpts = slow_staging_run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{s}" for s in setup["weights"]]
    for step, expected in setup["weights"].items():
        assert_same_weights(ckpts / f"step_{step}", expected)
    assert_protocol_holds(ckpts)
    assert_same_curve(slow_staging_run, setup)


def test_async_run_resumed_mid_run_ends_as_the_synchronous_run(setup, slow_staging_run):
    """The async run's step_4 (and nothing after it) resumed with checkpoint.async=true: the losses, gradient norms
    and final weights are the uninterrupted synchronous run's."""
    run_dir = setup["root"] / "resumed"
    shutil.copytree(slow_staging_run, run_dir)
    ckpts = run_dir / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name[5:]) > 4:
            shutil.rmtree(p)
    (ckpts / "latest").write_text("step_4")
    r = run2(setup["config"], f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed_from(run_dir)[-1] == 4
    assert_same_curve(run_dir, setup)
    assert_same_weights(ckpts / f"step_{STEPS}", setup["weights"][STEPS])
    assert_protocol_holds(ckpts)


def test_kill_9_during_background_writes_resumes_from_the_previous_checkpoint(setup):
    """kill -9 of the whole job at a random moment of the background write of step_4, then of step_6 (each write
    slowed by 1 s): `latest` still names the previous, complete checkpoint, the half-written directory is ignored
    and removed at the next start, and the last restart ends with the uninterrupted run's losses and weights."""
    run_dir = setup["root"] / "killed"
    ckpts = run_dir / "checkpoints"
    rng = random.Random(0)
    for n, (writing, before) in enumerate([(4, 2), (6, 4)]):
        proc = start2(setup["config"], f"run.dir={run_dir}", write_s=1.0)
        try:
            wait_for(ckpts / f".tmp_step_{writing}", proc)
            time.sleep(rng.uniform(0.0, 1.2))
            assert proc.poll() is None
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
        assert read_pointer(ckpts)[0] == ckpts / f"step_{before}"
        assert damage(ckpts / f"step_{before}") is None
        assert not (ckpts / f"step_{writing}").exists()
        assert resumed_from(run_dir)[-1] == [None, 2][n]
    r = run2(setup["config"], f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert resumed_from(run_dir) == [None, 2, 4]
    assert_same_curve(run_dir, setup)
    assert_same_weights(ckpts / f"step_{STEPS}", setup["weights"][STEPS])
    assert_protocol_holds(ckpts)


def test_background_write_failing_on_one_rank_is_one_line_and_training_goes_on(setup):
    """Rank 1's write of step_4 fails: one line names rank 1 and says step_2 stays the latest; the directory is
    removed, training goes on unchanged and the later checkpoints are written."""
    run_dir = setup["root"] / "failed"
    r = run2(setup["config"], f"run.dir={run_dir}", fail_rank=1, fail_step=4)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    said = [line for line in out.splitlines() if "could not be written" in line]
    assert len(said) == 1, said
    assert "checkpoint step_4 could not be written in the background (rank 1: PermissionError" in said[0]
    assert "step_2 stays the latest; training goes on" in said[0]
    assert "Traceback" not in out
    ckpts = run_dir / "checkpoints"
    assert sorted(int(p.name[5:]) for p in ckpts.glob("step_*")) == [2, 6, 8]
    assert_protocol_holds(ckpts)
    assert_same_curve(run_dir, setup)


def test_sigterm_during_a_background_write_waits_for_it_and_exits_with_a_complete_checkpoint(setup):
    """SIGTERM to the job while step_4's write is in flight (slowed by 1.5 s): the rank waits for it, publishes it,
    writes its stop checkpoint and exits 0; every checkpoint on disk is complete and `latest` names the stop one."""
    run_dir = setup["root"] / "sigterm"
    ckpts = run_dir / "checkpoints"
    proc = start2(setup["config"], f"run.dir={run_dir}", write_s=1.5)
    try:
        wait_for(ckpts / ".tmp_step_4", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stop signal received: stopped at step" in out, err[-3000:]
    assert "error:" not in err and "Traceback" not in out, err[-3000:]
    assert f"checkpoint saved: {ckpts / 'step_4'} (written in the background)" in out, out
    stopped = next(line for line in out.splitlines() if "stop signal received" in line)
    step = int(stopped.split("stopped at step ")[1].split(";")[0])
    assert 4 <= step < STEPS
    assert read_pointer(ckpts)[0] == ckpts / f"step_{step}"
    assert_protocol_holds(ckpts)
    assert_same_weights(ckpts / "step_4", setup["weights"][4])


def test_the_config_key_is_async(tmp_path, corpus, gpt_tok):
    """`async` is a Python keyword: the field is `async_`, the key in YAML, overrides, messages and config.yaml is
    `async`."""
    from trainer.config import load_config
    from trainer.errors import UserError

    path = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok), tmp_path / "c.yaml")
    assert load_config(path).checkpoint.async_ is False
    cfg = load_config(path, ["checkpoint.async=true"])
    assert cfg.checkpoint.async_ is True
    assert cfg.to_dict()["checkpoint"]["async"] is True and "async_" not in cfg.to_dict()["checkpoint"]
    again = write_config(cfg.to_dict(), tmp_path / "again.yaml")  # config.yaml as a run writes it reads back
    assert load_config(again).checkpoint.async_ is True
    with pytest.raises(UserError, match=r"unknown config key checkpoint\.asynk \(did you mean checkpoint\.async\?\)"):
        load_config(path, ["checkpoint.asynk=true"])
    with pytest.raises(UserError, match="config key checkpoint.async expects true/false"):
        load_config(path, ["checkpoint.async=3"])
    with pytest.raises(UserError, match=r"unknown config key checkpoint\.async_"):
        load_config(path, ["checkpoint.async_=true"])
