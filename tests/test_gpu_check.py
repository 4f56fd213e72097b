"""bench/gpu_check.py on a CPU machine: its refusal, the table, the targets and pass/fail judgement, rows that cannot run,
the exit status, and the measuring functions of the rows that run on CPU at tiny shapes (the parity of FSDP2 and DDP
in a process group of one, context parallelism's attention against one attention, the peak memory against the plan,
the trainer's step against transformers', the async checkpoint worker)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_check

CPU = torch.device("cpu")
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@needs_cpu_only
def test_refuses_at_once_without_a_gpu():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a GPU" in lines[0], proc.stderr


def test_unknown_row_is_one_line(capsys):
    assert gpu_check.main(["--rows", "env,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "cp-attention" in err[0], err


def test_rows_are_isolated_and_a_failed_row_fails_the_command():
    """A task that raises is one FAIL row with its error's first line; the tasks after it still run; SKIP and info
    rows do not fail the command; the table has one line per row."""

    def boom(ctx):
        raise RuntimeError("CUDA error: device-side assert\nsecond line")

    tasks = {
        "a": lambda ctx: [gpu_check.judged("a", "1.2x", ">= 1.0x", True)],
        "b": boom,
        "c": lambda ctx: [gpu_check.skipped("c", "needs 2 GPUs"), gpu_check.Row("c2", "x | y", "-", gpu_check.INFO)],
    }
    said = []
    rows = gpu_check.run_tasks(list(tasks), SimpleNamespace(device=CPU), tasks, say=lambda *a, **k: said.append(a[0]))
    assert [r.result for r in rows] == ["PASS", "FAIL", "SKIP", "info"]
    assert rows[1].figure == "RuntimeError: CUDA error: device-side assert"
    assert rows[2].figure == "cannot run: needs 2 GPUs"
    assert all(r.seconds is not None for r in (rows[0], rows[1], rows[2])) and rows[3].seconds is None
    assert len(said) == 4
    assert gpu_check.exit_status(rows) == 1
    assert gpu_check.exit_status([rows[0], rows[2], rows[3]]) == 0
    table = gpu_check.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| check | figure | target | result")
    assert all(line.count("|") == 6 for line in table)  # a '|' in a figure does not split its cell


def test_two_gpu_row_says_it_cannot_run():
    (row,) = gpu_check.parity_2gpu_task(SimpleNamespace(device=CPU, quick=True, gpus=1))
    assert row.result == "SKIP" and "needs 2 GPUs, this machine has 1" in row.figure


def test_targets():
    """Each row's judgement at its boundary: speed >= 1.0x, MFU above 40% for the 1B model, memory within 10% of the
    plan, parity 1e-4 relative, cp attention within 2^-7 of one attention's error, async <= 25% of a sync save;
    quick shapes report speed without judging it."""
    trainer = {"tokens_per_s": 1000.0, "flops_per_token": 1e9, "peak_bytes": 109, "predicted_bytes": 100}
    trainer["predicted_at"] = "start of backward"
    rows = gpu_check.throughput_rows("m", trainer, 1000.0, 2.4e12, 0.40, quick=False)
    assert [r.result for r in rows] == ["PASS", "PASS", "PASS"]  # 1.00x, MFU 41.7%, +9%
    rows = gpu_check.throughput_rows("m", {**trainer, "peak_bytes": 111}, 1001.0, 2.6e12, 0.40, quick=False)
    assert [r.result for r in rows] == ["FAIL", "FAIL", "FAIL"]  # 0.999x, MFU 38.5%, +11%
    assert [r.result for r in gpu_check.throughput_rows("m", trainer, 2000.0, 1e15, 0.4, quick=True)][:2] == [
        "info"
    ] * 2
    assert (
        gpu_check.memory_row("m", 89, 100, "x").result == "FAIL"
        and gpu_check.memory_row("m", 91, 100, "x").result == "PASS"
    )

    single = {"loss": [2.0, 1.9], "grad_norm": [1.0, 0.9]}
    near = {"loss": [2.0, 1.9 * (1 + 9e-5)], "grad_norm": [1.0, 0.9]}
    far = {"loss": [2.0, 1.9], "grad_norm": [1.0, 0.9 * (1 + 2e-4)]}
    rows = gpu_check.parity_rows({"single": single, "fsdp": near, "ddp": far}, "world 1")
    assert [r.result for r in rows] == ["PASS", "FAIL"]

    errors = {"out": 4e-3, "dq": 5e-3, "dk": 6e-3, "dv": 5e-3}
    slack = gpu_check.CP_SLACK
    near = {"cp": {**errors, "dk": 6e-3 + slack * 0.99}, "plain": errors}
    far = {"cp": {**errors, "dv": 5e-3 + slack * 1.01}, "plain": errors}
    flash = ["aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward"]
    math_kernel = ["aten::_scaled_dot_product_attention_math"]
    result = {
        "MHA": {"ranks": {"cp2 rank 0": near, "cp4 rank 3": near}, "kernels": flash, "chunk": 32},
        "GQA": {"ranks": {"cp2 rank 0": near, "cp4 rank 3": far}, "kernels": flash + math_kernel, "chunk": 32},
    }
    rows = gpu_check.cp_rows(result, CPU)
    assert [r.result for r in rows] == ["PASS", "info", "FAIL", "info"]  # kernels are judged on CUDA only
    assert "(cp4 rank 3 dv)" in rows[2].figure
    assert [r.result for r in gpu_check.cp_rows(result, torch.device("cuda"))] == ["PASS", "PASS", "FAIL", "FAIL"]

    save = {"sync": 2.0, "first": 0.3, "base_step": 0.1, "n_params": 83e6}
    assert gpu_check.async_rows({**save, "blocked": 0.5})[0].result == "PASS"
    assert gpu_check.async_rows({**save, "blocked": 0.51})[0].result == "FAIL"
    assert gpu_check.async_rows({**save, "blocked": 0.51}, quick=True)[0].result == "info"


def test_profile_rows_judge_the_trainer_runs(tmp_path):
    """The profile row reads the traced run's files and the out-of-memory run's line and snapshot."""
    profile = tmp_path / "traced" / "profile"
    profile.mkdir(parents=True)
    events = [{"name": f"ProfilerStep#{n}", "cat": "user_annotation"} for n in (2, 3)] + [
        {"name": "k", "cat": "kernel"}
    ]
    (profile / "rank0_step2-3.json").write_text(json.dumps({"traceEvents": events}))
    (profile / "rank0_memory_step3.pickle").write_bytes(pickle.dumps({"segments": [], "device_traces": []}))
    (tmp_path / "oom" / "profile").mkdir(parents=True)
    (tmp_path / "oom" / "profile" / "rank0_memory_oom.pickle").write_bytes(b"x")
    line = "error: rank 0 ran out of memory (CUDA out of memory. Tried to allocate 4.00 GiB): lower ..."
    runs = {
        "traced": {"rc": 0, "stderr": "", "dir": tmp_path / "traced"},
        "oom": {"rc": 2, "stderr": f"warning: the predicted peak ...\n{line}\n", "dir": tmp_path / "oom"},
    }
    assert [r.result for r in gpu_check.profile_rows(runs, torch.device("cuda"))] == ["PASS", "PASS", "PASS"]
    runs["oom"]["stderr"] = "Traceback (most recent call last):\n" + line
    events.pop()  # no CUDA kernel in the trace
    (profile / "rank0_step2-3.json").write_text(json.dumps({"traceEvents": events}))
    assert [r.result for r in gpu_check.profile_rows(runs, torch.device("cuda"))] == ["FAIL", "PASS", "FAIL"]


def test_parity_in_a_process_group_of_one_on_cpu():
    """The parity row's measurement on CPU (gloo): FSDP2 ZeRO-3 and DDP in a process group of one equal one process
    without a group; it leaves no process group behind."""
    result = gpu_check.parity(CPU)
    rows = gpu_check.parity_rows(result, "world 1 (gloo)")
    assert result["backend"] == "gloo" and result["all_reduce"] == 1.0
    assert [r.result for r in rows] == ["PASS", "PASS", "PASS"], rows
    assert not torch.distributed.is_initialized()


def test_cp_attention_on_cpu():
    """The cp row's measurement at small shapes on CPU: a rank's two chunks through the lower-right path, forward and
    backward in bf16, within the row's tolerance of one causal attention's error."""
    ranks = {}
    for degree, rank in ((2, 1), (4, 0)):
        r = gpu_check.attention_errors((4, 2, 16), degree, rank, 32, CPU)
        assert set(r["cp"]) == {"out", "dq", "dk", "dv"} and r["kernels"]
        ranks[f"cp{degree} rank {rank}"] = {"cp": r["cp"], "plain": r["plain"]}
    row, _ = gpu_check.cp_rows({"GQA 4/2x16": {"ranks": ranks, "kernels": r["kernels"], "chunk": 32}}, CPU)
    assert row.result == "PASS", row


def test_step_rate_and_memory_against_the_plan_on_cpu():
    """The model rows' measurements at a tiny shape on CPU, eager: the trainer's step and transformers' model of the
    same dims both train; the peak of live tensors is within 10% of `trainer plan`'s prediction."""
    model = {"arch": "llama", "preset": "llama-tiny", "vocab_size": 1000}
    trainer = gpu_check.trainer_step_rate(model, 32, 2, CPU, 1, (1, 2))
    assert trainer["tokens_per_s"] > 0 and trainer["flops_per_token"] > 0
    peer = gpu_check.peer_step_rate(trainer, 32, 2, CPU, 1, (1, 2))
    rows = gpu_check.throughput_rows("llama-tiny", trainer, peer, 1e12, None, quick=True)
    assert rows[-1].result == "PASS", rows[-1]


def test_async_checkpoint_worker_on_cpu():
    """The async row runs bench/async_checkpoint.py's worker as one torchrun rank and reads its figures."""
    r = gpu_check.async_checkpoint(quick=True, saves=1)
    assert r["sync"] > 0 and r["blocked"] > 0 and r["n_params"] > 0
    (row,) = gpu_check.async_rows(r, quick=True)
    assert "per save" in row.figure
