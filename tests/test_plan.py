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
