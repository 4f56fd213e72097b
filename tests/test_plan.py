"""`trainer plan`: the memory formula against what real training steps hold, layout by layout (the accuracy table),
mutations of the formula that the table must catch, the command line, and the prediction `trainer train` states."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, read_metrics, tiny_config, write_config

sys.path.insert(0, str(REPO / "bench"))

import plan_accuracy

from trainer.cli import main
from trainer.plan import memory

ROWS = list(plan_accuracy.rows())


@pytest.fixture(scope="module")
def measured():
    """Every row of the table measured once on real gloo ranks (about 90 s on 2 cores)."""
    return plan_accuracy.run(ROWS)


def failures(measured: dict) -> list[str]:
    """Rows and categories where the formula misses the measurement by more than the tolerance."""
    out = []
    for name in ROWS:
        predicted = plan_accuracy.predict(name)
        for cat, err in plan_accuracy.worst(measured[name], predicted).items():
            if abs(err) > plan_accuracy.TOLERANCE[cat]:
                out.append(f"{name} {cat} {err:+.1%}")
    return out


@pytest.mark.parametrize("row", ROWS)
def test_formula_matches_a_real_step(measured, row):
    """Each category within 5% of what the step held on every rank, the peak within 10%."""
    predicted = plan_accuracy.predict(row)
    for rank in measured[row]:
        errs = plan_accuracy.errors(rank["measured"], predicted[rank["pp_rank"]])
        for cat, err in errs.items():
            assert abs(err) <= plan_accuracy.TOLERANCE[cat], (row, rank["rank"], cat, f"{err:+.1%}", rank["measured"])


def test_table_catches_a_block_without_activations(measured, monkeypatch):
    real = memory.stage_activations

    def one_block_short(model_cfg, layout, seq_len, n_layers, first, last):
        total = real(model_cfg, layout, seq_len, n_layers, first, last)
        saved = model_cfg.saved_bytes(layout.micro_batch, seq_len, layout.tp, 4)
        return total - (saved["block"] if layout.activation_checkpointing == "none" else saved["block_input"])

    monkeypatch.setattr(memory, "stage_activations", one_block_short)
    assert failures(measured)


def test_table_catches_a_forgotten_zero3_gather(measured, monkeypatch):
    monkeypatch.setattr(memory, "zero3_gathered", lambda mine, tp, ce: 0)
    missed = failures(measured)
    assert any("fsdp3" in f for f in missed), missed


def plan_config(tmp_path, **train) -> str:
    cfg = {
        "model": {"arch": "gpt", "preset": "gpt2-xl"},
        "data": {"train": ["unused.txt"], "tokenizer": "unused.json", "seq_len": 1024},
        "train": {"micro_batch": 4, "grad_accum": 1, "precision": "bf16", **train},
        "parallel": {"engine": "fsdp", "zero_stage": 3},
    }
    return str(write_config(cfg, tmp_path / "xl.yaml"))


def test_plan_json_ranks_layouts_and_names_the_command(tmp_path, capsys):
    path = plan_config(tmp_path)
    main(["plan", path, "--gpus", "16", "--gpus-per-node", "8", "--gpu", "a100-40g", "--json"])
    out = json.loads(capsys.readouterr().out)
    own = out["layout"]
    assert (own["engine"], own["zero_stage"], own["dp"], own["tp"], own["pp"]) == ("fsdp", 3, 16, 1, 1)
    for key in ("parameters", "gradients", "optimizer", "activations", "peak"):
        assert own["per_rank_bytes"][key] >= 0
    # parameters: the fp32 shard of 1.56B over 16 ranks (FSDP2 pads dim 0)
    assert own["per_rank_bytes"]["parameters"] == pytest.approx(4 * 1.558e9 / 16, rel=0.01)
    cands = out["candidates"]
    fits = [c for c in cands if c["fits"]]
    assert fits and all(c["fits"] for c in cands[: len(fits)])  # the ones that fit come first
    times = [c["step_time_s"] for c in fits]
    assert times == sorted(times)
    limit = out["cluster"]["usable_bytes"]
    assert all(c["per_rank_bytes"]["peak"] <= limit for c in fits)
    assert all(c["reason"] for c in cands if not c["fits"])  # each one that does not fit says why
    assert all(c["micro_batch"] * c["grad_accum"] * c["dp"] == out["global_batch"] for c in cands)
    assert out["command"].startswith("launch slurm --nodes 2 --gpus-per-node 8 -- ")
    best = fits[0]
    assert all(o in out["command"] for o in best["overrides"])


def test_plan_overrides_change_the_layout_and_text_output(tmp_path, capsys):
    path = plan_config(tmp_path)
    main(
        [
            "plan",
            path,
            "parallel.engine=ddp",
            "parallel.zero_stage=0",
            "train.micro_batch=1",
            "train.grad_accum=4",
            "--gpus",
            "8",
            "--gpu-memory",
            "24GiB",
        ]
    )
    text = capsys.readouterr().out
    assert "This config's layout: ddp dp8 tp1, AC none, micro-batch 1 x 4" in text
    assert "does NOT fit" in text  # 16 B per parameter of 1.56B on every rank does not fit 24 GiB
    assert "run the best:\n  launch local --nproc-per-node 8 -- " in text


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--gpus", "8", "--gpu", "h900"], "unknown --gpu 'h900'"),
        (["--gpus", "8", "--gpu-memory", "lots"], "cannot read 'lots' as a memory size"),
        (["--gpus", "6", "parallel.tp=4"], "--gpus 6 is not a multiple of parallel.tp x parallel.pp = 4"),
    ],
)
def test_plan_bad_input_is_one_line(tmp_path, capsys, argv, words):
    path = plan_config(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["plan", path, *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_train_states_the_predicted_peak_and_warns_when_it_exceeds_memory(
    tmp_path, corpus, gpt_tok, monkeypatch, capsys
):
    from trainer.config import load_config
    from trainer.train import train

    cfg = tiny_config(tmp_path / "run", corpus, gpt_tok, **{"train.steps": 2})
    monkeypatch.setattr("trainer.train.device_memory", lambda device, ranks: (1024, "a pretend 1 KiB device"))
    train(load_config(write_config(cfg, tmp_path / "c.yaml")))
    err = capsys.readouterr().err
    assert "warning: the predicted peak of" in err and "exceeds a pretend 1 KiB device" in err
    start = read_metrics(tmp_path / "run")[0]
    assert start["predicted_peak_bytes"] > 0 and start["predicted_bytes"]["activations"] > 0


# ---- the command `trainer plan` prints, its speed at scale, and its text report ----


def small_config(tmp_path, **model) -> str:
    """A 4-layer Llama whose YAML sets every layout key away from its default, so the printed command must set them
    all back for a layout that differs."""
    cfg = {
        "model": {"arch": "llama", "preset": "llama-mini", **model},
        "data": {"train": ["unused.txt"], "tokenizer": "unused.json", "seq_len": 64},
        "train": {"micro_batch": 2, "grad_accum": 4, "precision": "bf16", "activation_checkpointing": "full"},
        "parallel": {
            "engine": "fsdp",
            "zero_stage": 3,
            "tp": 2,
            "pp": 2,
            "pp_schedule": "interleaved-1f1b",
            "pp_split": [1, 1, 1, 1],
        },
    }
    return str(write_config(cfg, tmp_path / "mini.yaml"))


def started_layout(command: str) -> tuple[memory.Layout, int]:
    """The layout a printed `launch` command starts, read back through launch's own parser and the trainer's config
    loader: (layout, world size)."""
    import shlex

    from launch.cli import build_parser
    from trainer.config import load_config

    words = shlex.split(command)
    assert words[0] == "launch"
    args = build_parser().parse_args(words[1:])
    if args.command == "local":
        world = args.nproc_per_node * args.nnodes
    else:
        world = args.nodes * (args.nproc_per_node or args.gpus_per_node)
    return memory.Layout.from_config(load_config(args.config, args.overrides), world), world


def kind(lay: memory.Layout) -> set[str]:
    out = {f"{lay.engine}{lay.zero_stage}" + ("+offload" if lay.offload != "none" else "")}
    out |= {axis for axis in ("tp", "pp", "cp") if getattr(lay, axis) > 1}
    return out


@pytest.mark.parametrize("gpus_per_node", [8, 4, 2])
def test_plan_command_starts_exactly_the_layout_it_ranked(tmp_path, capsys, gpus_per_node):
    """Every layout's command (ddp, fsdp ZeRO-2/3, DeepSpeed with and without offload, tp, pp, cp; on one node and
    on several) starts that layout: the same world size, degrees, engine and micro-batching, the planned global
    batch; and the command printed is the first ranked layout's."""
    from trainer.config import load_config
    from trainer.plan.hardware import accelerator
    from trainer.plan.report import launch_command
    from trainer.plan.search import search

    path = small_config(tmp_path)
    user = ["train.lr=1e-3", "data.train=[a.txt, b.txt]"]
    main(["plan", path, "--gpus", "8", "--gpus-per-node", str(gpus_per_node), "--json", *user])
    out = json.loads(capsys.readouterr().out)
    best = next(c for c in out["candidates"] if c["fits"])
    lay, world = started_layout(out["command"])
    assert world == 8
    assert lay.overrides() == best["overrides"]
    assert lay.micro_batch * lay.grad_accum * lay.dp == out["global_batch"] == 16

    cfg = load_config(path, user)
    acc = accelerator(None, gpus_per_node=gpus_per_node)
    own = memory.Layout.from_config(cfg, 8)
    seen = set()
    for c in search(*plan_model_of(cfg), own, 64, acc, 0.9):
        command = launch_command(path, cfg, user, c.layout, acc)
        lay, world = started_layout(command)
        assert (lay, world) == (c.layout, 8), command
        assert lay.micro_batch * lay.grad_accum * lay.dp == 16
        assert ("launch local" in command) == (gpus_per_node == 8)
        seen |= kind(lay)
    assert {"ddp0", "fsdp2", "fsdp3", "deepspeed1", "deepspeed3+offload", "tp", "pp", "cp"} <= seen, seen


def plan_model_of(cfg) -> tuple:
    from trainer.plan.report import plan_model

    return (plan_model(cfg)[0],)


def test_plan_refuses_gpus_that_do_not_fill_whole_nodes(tmp_path, capsys):
    """8 GPUs on nodes of 3 cannot be started as 8 ranks: refused in one line, not planned for 9."""
    with pytest.raises(SystemExit) as exc:
        main(["plan", small_config(tmp_path), "--gpus", "8", "--gpus-per-node", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus 8" in err[0] and "--gpus-per-node 3" in err[0], err


def llama_70b(tmp_path) -> str:
    """Llama 3 70B by its dimensions (as a user without a preset gives it)."""
    cfg = {
        "model": {
            "arch": "llama",
            "n_layer": 80,
            "d_model": 8192,
            "n_head": 64,
            "n_kv_heads": 8,
            "d_ff": 28672,
            "vocab_size": 128256,
            "max_seq_len": 4096,
        },
        "data": {"train": ["unused.txt"], "tokenizer": "unused.json", "seq_len": 4096},
        "train": {"micro_batch": 1, "grad_accum": 8, "precision": "bf16"},
    }
    return str(write_config(cfg, tmp_path / "70b.yaml"))


def test_plan_of_70b_on_64_gpus_answers_within_a_minute(tmp_path, capsys):
    """A guard, not a benchmark (bench/plan_speed.py has the figures): the search over a 70B model on 64 GPUs, which
    ran for minutes, answers well within 60 s even on a loaded 2-core machine."""
    import time

    start = time.perf_counter()
    main(["plan", llama_70b(tmp_path), "--gpus", "64", "--json"])
    seconds = time.perf_counter() - start
    out = json.loads(capsys.readouterr().out)
    assert out["command"].startswith("launch slurm --nodes 8 --gpus-per-node 8 ")
    assert seconds < 60, seconds


def test_plan_says_how_far_it_got_when_it_takes_a_while(tmp_path, capsys, monkeypatch):
    """Progress goes to stderr (the JSON on stdout stays whole) once a search runs longer than a few seconds."""
    from trainer.plan import search

    monkeypatch.setattr(search, "PROGRESS_AFTER_S", 0.0)
    main(["plan", small_config(tmp_path), "--gpus", "8", "--json"])
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert "searched" in captured.err and "layouts" in captured.err, captured.err


def test_plan_text_scales_its_units_for_small_models(tmp_path, capsys):
    """A tiny model's figures are printed in MiB/KiB, ms/us and GFLOP/MFLOP, never as zeros of a large unit."""
    main(["plan", small_config(tmp_path), "--gpus", "8"])
    text = capsys.readouterr().out
    for zero in ("0.00 GiB", "0.0 GiB", "0.000 s", "0.0 TFLOP", "0.00 GB", "0.00B parameters"):
        assert zero not in text, (zero, text)
    assert "MiB" in text and "FLOP per rank" in text and "M parameters" in text


@pytest.mark.parametrize(
    "model,tokenizer,words",
    [
        ({"vocab_size": 1000}, True, "vocabulary 1,000 from model.vocab_size"),
        ({}, True, "vocabulary 512 from the tokenizer"),
        ({}, False, "vocabulary 2,048 from preset llama-mini"),
    ],
)
def test_plan_header_says_where_the_vocabulary_came_from(tmp_path, capsys, gpt_tok, model, tokenizer, words):
    path = small_config(tmp_path, **model)
    main(["plan", path, "--gpus", "4", *([f"data.tokenizer={gpt_tok}"] if tokenizer else [])])
    header = capsys.readouterr().out.splitlines()[0]
    assert words in header, header


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--gpu-memory", "0GiB"], "--gpu-memory 0GiB"),
        (["--gpu-memory=-8GiB"], "cannot read '-8GiB' as a memory size"),
        (["--gpu-memory", "1.2.3GiB"], "cannot read '1.2.3GiB' as a memory size"),
        (["--gpus-per-node", "0"], "--gpus-per-node 0"),
        (["--peak-tflops", "0"], "--peak-tflops 0"),
        (["--inter-node-gbps", "-1"], "--inter-node-gbps -1"),
    ],
)
def test_plan_refuses_non_positive_hardware_in_one_line(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        main(["plan", small_config(tmp_path), "--gpus", "8", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


# ---- the pipeline schedules the planner plays, fast ----


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zbv"])
def test_per_rank_orders_are_torchs_own(schedule):
    """The planner reads interleaved 1F1B's and ZBV's orders straight from torch's per-rank method (seconds faster at
    pp 32); they are the orders torch's own get_schedule_ops gives."""
    from torch.distributed import pipelining
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    from trainer.parallel.pipeline import SCHEDULES
    from trainer.plan.schedule import _rank_operations

    cls = getattr(pipelining, SCHEDULES[schedule][0])
    for v in (2, 3) if schedule == "interleaved-1f1b" else (2,):  # parallel.pp_virtual stages per rank
        for p, m in [(2, 2), (2, 5), (3, 7), (4, 4), (4, 12), (8, 9), (8, 16)]:
            if schedule == "interleaved-1f1b" and m > p and m % p:
                continue
            fast = _rank_operations(schedule, p, m, v)
            assert fast is not None
            assert [list(r) for r in fast] == [list(r) for r in get_schedule_ops(cls, p, m, v)], (p, m, v)


def test_plan_weighs_a_layout_with_three_stages_per_rank(tmp_path, capsys):
    """parallel.pp_virtual=3 under interleaved 1F1B: the schedule is played with three stages per rank (it was
    played with two, and waited forever for a stage that did not exist)."""
    path = small_config(tmp_path, n_layer=12)
    main(["plan", path, "--gpus", "4", "--json", "parallel.pp_split=null", "parallel.pp_virtual=3", "parallel.tp=1"])
    own = json.loads(capsys.readouterr().out)["layout"]
    assert (own["pp"], own["pp_schedule"]) == (2, "interleaved-1f1b") and own["fits"], own
    assert len(own["per_pp_rank_peak_bytes"]) == 2


def test_1f1b_of_equal_stages_takes_the_textbook_time():
    """p equal stages, m micro-batches, forward t and backward 2t: (m + p - 1) x 3t, bubble (p - 1) / (m + p - 1)."""
    from trainer.plan.schedule import play

    for p, m in [(2, 2), (4, 4), (4, 9), (8, 32)]:
        r = play("1f1b", p, m, [{"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}] * p)
        assert r["step_s"] == pytest.approx((m + p - 1) * 3.0)
        assert max(r["bubble"]) == pytest.approx((p - 1) / (m + p - 1))
        assert r["peak_in_flight"][0] == min(m, p)  # rank 0 holds p micro-batches at once


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "zbv"])
def test_a_long_step_is_extrapolated_exactly(monkeypatch, schedule):
    """play_steady (a step of many micro-batches played as a shorter one) gives what playing it whole gives, for the
    planner's own stage splits: blocks plus the head on the last stage, and a first stage one block heavier than the
    rest, whose slack takes ten rounds to run out (extrapolating from earlier rounds would be 4% short)."""
    from trainer.parallel.pipeline import SCHEDULES, balanced_split
    from trainer.plan import schedule as sched

    monkeypatch.setattr(sched, "EXACT_ACTIONS", 0)
    v = SCHEDULES[schedule][2] or 2
    for p, n_layer, head in [(4, 32, 1.9), (8, 80, 0.8), (16, 32 if v == 1 else 40, 1.9)]:
        split = balanced_split(n_layer, p * v, head)
        cost = [k + (head if s == p * v - 1 else 0.0) for s, k in enumerate(split)]
        costs = [{"F": c, "B": 2 * c, "I": c, "W": c} for c in cost]
        held = [1000.0 * k + (5000.0 if s == 0 else 0.0) for s, k in enumerate(split)]
        for m in (9 * p, 20 * p):
            whole, steady = sched.play(schedule, p, m, costs, held), sched.play_steady(schedule, p, m, costs, held)
            assert steady["step_s"] == pytest.approx(whole["step_s"], rel=1e-9), (p, m)
            assert steady["bubble"] == pytest.approx(whole["bubble"], abs=1e-9), (p, m)
            for key in ("peak_held_bytes", "peak_after_backward", "peak_in_flight"):
                assert steady[key] == whole[key], (p, m, key)
