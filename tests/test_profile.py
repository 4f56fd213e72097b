"""Profiler traces and memory snapshots from the config: `profile.steps` writes one torch.profiler trace per rank, of
the steps named, that loads as JSON with those steps' events; a resumed run traces the steps it has left; bad values
and `profile.memory_snapshot` without a GPU are refused in one line; a rank out of memory ends with one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_metrics, run_cli, tiny_config, torchrun, write_config

from trainer.config import load_config
from trainer.errors import UserError
from trainer.profiling import _AT, out_of_memory
from trainer.train import train


def trace(path) -> tuple[list[str], set[str]]:
    """The step ranges (sorted) and the other event names of a Chrome trace file."""
    names = {e.get("name", "") for e in json.loads(path.read_text())["traceEvents"]}
    return sorted(n for n in names if n.startswith("ProfilerStep#")), names


def test_profile_steps_write_a_trace_of_those_steps(tmp_path, corpus, gpt_tok):
    cfg = tiny_config(tmp_path / "run", corpus, gpt_tok, **{"profile.steps": [2, 3], "data.valid": []})
    train(load_config(write_config(cfg, tmp_path / "c.yaml")))
    files = sorted(p.name for p in (tmp_path / "run" / "profile").iterdir())
    assert files == ["rank0_step2-3.json"]
    steps, names = trace(tmp_path / "run" / "profile" / files[0])
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # step 1 warmed the profiler up, step 4 ran without it
    assert names & {"aten::mm", "aten::addmm"} and "aten::embedding" in names
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3, 4]


def test_a_resumed_run_traces_the_steps_it_has_left(tmp_path, corpus, gpt_tok):
    """Profiling off writes nothing; a run resumed at step 2 with profile.steps=[2,3] traces step 3 (its name says
    so)."""
    run = tmp_path / "run"
    cfg = tiny_config(run, corpus, gpt_tok, **{"train.steps": 2, "data.valid": []})
    train(load_config(write_config(cfg, tmp_path / "a.yaml")))
    assert not (run / "profile").exists()
    cfg = tiny_config(run, corpus, gpt_tok, **{"train.steps": 4, "data.valid": [], "profile.steps": [2, 3]})
    train(load_config(write_config(cfg, tmp_path / "b.yaml")))
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["rank0_step3.json"]
    assert trace(run / "profile" / "rank0_step3.json")[0] == ["ProfilerStep#3"]


def test_two_ranks_write_one_trace_each(tmp_path, corpus, gpt_tok):
    cfg = tiny_config(tmp_path / "run", corpus, gpt_tok, **{"profile.steps": [3, 3], "data.valid": []})
    r = torchrun(2, write_config(cfg, tmp_path / "c.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    profile = tmp_path / "run" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["rank0_step3.json", "rank1_step3.json"]
    for name in ("rank0_step3.json", "rank1_step3.json"):
        steps, names = trace(profile / name)
        assert steps == ["ProfilerStep#3"] and "aten::mm" in names | {"aten::addmm"}, name
    assert r.stdout.count("profile: steps 3 traced") == 1  # said once, by rank 0


@pytest.mark.parametrize(
    ("steps", "says"),
    [
        ([3, 2], "profile.steps=[3, 2] ends before it starts"),
        ([0, 2], "profile.steps=[0, 2]: steps count from 1"),
        ([-1, 2], "profile.steps=[-1, 2]: steps count from 1"),
        ([2, 9], "profile.steps=[2, 9] goes beyond train.steps=4"),
        ([2], "profile.steps=[2] must be two step numbers [first, last]"),
        ("x", "config key profile.steps expects a list of integers"),
    ],
)
def test_bad_profile_steps_are_refused(tmp_path, corpus, gpt_tok, steps, says):
    cfg = tiny_config(tmp_path / "run", corpus, gpt_tok, **{"profile.steps": steps})
    with pytest.raises(UserError) as e:
        load_config(write_config(cfg, tmp_path / "c.yaml"))
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_memory_snapshot_without_a_gpu_is_one_line_before_anything_is_built(tmp_path, corpus, gpt_tok):
    cfg = tiny_config(tmp_path / "run", corpus, gpt_tok)
    r = run_cli("trainer", "train", str(write_config(cfg, tmp_path / "c.yaml")), "profile.memory_snapshot=true")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "profile.memory_snapshot=true records CUDA memory and needs a GPU" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_out_of_memory_is_one_line_with_the_fix(tmp_path, corpus, gpt_tok, monkeypatch):
    """What a rank out of memory exits with: its rank, the step (known while profiling), torch's first line, the fix,
    and where a memory snapshot is (or how to get one)."""
    monkeypatch.setenv("RANK", "1")
    cfg = load_config(write_config(tiny_config(tmp_path / "run", corpus, gpt_tok), tmp_path / "c.yaml"))
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has 80 GiB\nmore details")
    monkeypatch.setitem(_AT, "step", 3)
    line = str(out_of_memory(error, cfg))
    assert "\n" not in line
    assert line.startswith("rank 1 ran out of memory at step 3 (CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "lower train.micro_batch" in line and "profile.memory_snapshot=true records where the memory went" in line
