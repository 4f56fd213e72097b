"""`launch slurm` on a real Slurm cluster: Debian's slurmctld and two slurmd daemons emulating nodes n1 and n2 on this
host (tests/slurm_cluster.py installs the packages if it can, starts the daemons and stops them by PID). Jobs on one
and two nodes train the same curve as `launch local`; a job warned with USR1 (as before a time limit or preemption)
checkpoints, requeues itself and resumes with no step missing or repeated."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from conftest import REPO, read_metrics, run_cli, tiny_config, write_config

BASE = {"train.micro_batch": 1, "train.grad_accum": 2, "train.eval_every": 0, "log.every": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.ensure_installed()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    # One thread per rank, as in the local reference: torchrun sets it only with several processes per node, and
    # a 2-node x 1 job would otherwise multiply matrices on 2 threads, rounding differently from the reference.
    env = {**os.environ, **slurm_cluster.start(root), "OMP_NUM_THREADS": "1"}
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, check=False)
    slurm_cluster.stop(root)


def submit(env: dict, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "launch", "slurm", *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr[-3000:]
    match = re.match(r"submitted job (\d+)", r.stdout)
    assert match, r.stdout
    return match.group(1)


def job_field(env: dict, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, check=False).stdout
    found = re.search(rf"\b{field}=(\S+)", out)
    return found.group(1) if found else ""


def wait_done(env: dict, job: str, run_dir: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(env, job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            logs = "".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))
            assert state == "COMPLETED", f"job {job} {state}:\n{logs[-4000:]}"
            return
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_field(env, job, 'JobState')} after {timeout} s")


def steps(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "loss" in m and "event" not in m}


def assert_same_curve(reference: Path, run_dir: Path) -> None:
    ref, got = steps(reference), steps(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert math.isclose(got[step]["loss"], ref[step]["loss"], rel_tol=1e-5), (step, got[step], ref[step])


def local_reference(tmp_path: Path, corpus: Path, tok: Path, **overrides) -> Path:
    cfg = write_config(tiny_config(tmp_path / "ref", corpus, tok, **{**BASE, **overrides}), tmp_path / "ref.yaml")
    r = run_cli("launch", "local", "--nproc-per-node", "2", "--", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / "ref"


@pytest.mark.parametrize(("nodes", "per_node"), [(1, 2), (2, 1)], ids=["1_node_x_2", "2_nodes_x_1"])
def test_slurm_job_trains_like_launch_local(cluster, tmp_path, corpus, gpt_tok, nodes, per_node):
    overrides = {"train.steps": 12}
    reference = local_reference(tmp_path, corpus, gpt_tok, **overrides)
    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **{**BASE, **overrides}), tmp_path / "c.yaml")
    job = submit(cluster, "--nodes", str(nodes), "--nproc-per-node", str(per_node), "--", str(cfg))
    wait_done(cluster, job, tmp_path / "run")
    assert read_metrics(tmp_path / "run")[0]["world_size"] == 2
    node_logs = sorted(p.name for p in (tmp_path / "run" / "logs").glob(f"test-{job}-node*.out"))
    assert len(node_logs) == nodes, node_logs  # one log per node, named by job and node
    assert_same_curve(reference, tmp_path / "run")


def test_warned_job_checkpoints_requeues_and_resumes(cluster, tmp_path, corpus, gpt_tok):
    """USR1 to the batch script, as Slurm sends it --signal-seconds before the time limit (or at preemption): every
    rank checkpoints at the end of its step, the job requeues itself, and the requeued job resumes from the
    checkpoint and finishes: the steps are continuous and every loss is the uninterrupted run's."""
    overrides = {"train.steps": 200, "checkpoint.every": 0}
    reference = local_reference(tmp_path, corpus, gpt_tok, **overrides)
    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **{**BASE, **overrides}), tmp_path / "c.yaml")
    job = submit(cluster, "--nodes", "2", "--", str(cfg))
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() or max(steps(tmp_path / "run"), default=0) < 20:
        assert time.monotonic() < deadline, job_field(cluster, job, "JobState")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    wait_done(cluster, job, tmp_path / "run")
    assert job_field(cluster, job, "Restarts") == "1"
    batch_log = (tmp_path / "run" / "logs" / f"test-{job}.out").read_text()
    assert "requeueing job" in batch_log and "the run is complete (step 200)" in batch_log, batch_log
    starts = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "start"]
    assert len(starts) == 2 and 20 <= starts[1]["resumed_from_step"] < 200
    assert_same_curve(reference, tmp_path / "run")
