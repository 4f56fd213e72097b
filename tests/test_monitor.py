"""MetricsLogger (metrics.jsonl, W&B offline, progress lines) and the run report drawn from its output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainer.errors import UserError
from trainer.monitor import MetricsLogger
from trainer.report import make_report, summarize


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """W&B writing only under tmp_path, offline, with no credentials anywhere."""
    home = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    return home


def make_logger(
    run_dir: Path,
    mode: str = "disabled",
    run_id: str | None = None,
    start_step: int = 0,
    total_steps: int = 10,
    is_main: bool = True,
) -> MetricsLogger:
    return MetricsLogger(
        run_dir,
        is_main=is_main,
        total_steps=total_steps,
        start_step=start_step,
        wandb_mode=mode,
        wandb_project="tests",
        wandb_entity=None,
        run_name="unit",
        config={"train": {"lr": 1e-3}},
        wandb_run_id=run_id,
        progress=True,
    )


def step_metrics(step: int, loss: float) -> dict:
    return {
        "step": step,
        "tokens": step * 256,
        "loss": loss,
        "lr": 1e-3 * step,
        "grad_norm": 1.0 / step,
        "tokens_per_s": 1000.0 * step,
        "mfu": 0.01 * step,
        "step_time_s": 0.25,
        "mem_peak_gb": 0.5,
        "data_wait_s": 0.001,
    }


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_start_then_step_lines_strict_json(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with make_logger(run_dir) as log:
        log.start({"n_params": 123, "world_size": 1, "resumed_from_step": 0})
        log.log_step(step_metrics(1, 5.0))
        log.log_step({**step_metrics(2, math.nan), "grad_norm": math.inf, "mfu": -math.inf})
        log.log_eval({"step": 2, "val_loss": 4.5, "val_ppl": math.exp(4.5)})
        log.log_text(2, "sample", "to be or not")
    text = (run_dir / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    lines = read_lines(run_dir)
    assert lines[0]["event"] == "start" and lines[0]["n_params"] == 123
    assert {
        "step",
        "tokens",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "step_time_s",
        "mem_peak_gb",
        "data_wait_s",
    } <= lines[1].keys()
    assert lines[1]["loss"] == 5.0 and lines[1]["tokens"] == 256
    assert lines[2]["loss"] is None and lines[2]["grad_norm"] is None and lines[2]["mfu"] is None
    assert lines[3]["val_loss"] == 4.5 and lines[3]["step"] == 2
    assert lines[4] == {"step": 2, "sample": "to be or not"}
    out = capsys.readouterr().out  # stderr is not a TTY under pytest: one plain line per step
    assert "step 1/10 | loss 5.0000" in out and "loss n/a" in out
    assert "eval step 2 | val_loss 4.5000" in out
    assert "to be or not" in out


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    log = make_logger(tmp_path / "run", is_main=False, run_id="abc")
    log.start({"n_params": 1})
    log.log_step(step_metrics(1, 1.0))
    log.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""
    assert log.wandb_run_id == "abc"


def test_bad_wandb_mode_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="log.wandb.mode"):
        make_logger(tmp_path / "run", mode="sometimes")


def test_torn_last_line_is_ended_before_appending(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with make_logger(run_dir, start_step=1) as log:
        log.start({"resumed_from_step": 1})
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "start"


def test_wandb_offline_files_and_resume_same_id(tmp_path, wandb_env, capsys):
    run_dir = tmp_path / "run"
    log = make_logger(run_dir, mode="online")  # no credentials: falls back to offline
    assert "no API key" in capsys.readouterr().out
    run_id = log.wandb_run_id
    assert run_id
    log.start({"resumed_from_step": 0})
    for step in (1, 2):
        log.log_step(step_metrics(step, 3.0))
    log.log_text(2, "sample", "<b>escaped</b>")
    log.close()
    first = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1 and list(first[0].glob(f"run-{run_id}.wandb"))
    assert not list(wandb_env.rglob("offline-run-*")), "wandb must write under run_dir, not WANDB_DIR"

    resumed = make_logger(run_dir, mode="offline", run_id=run_id, start_step=2)
    assert resumed.wandb_run_id == run_id
    resumed.log_step(step_metrics(3, 2.0))
    resumed.close()
    # The resumed run's files (a new offline-run-* directory per start) keep the id; the SIGTERM/resume test in
    # test_train.py checks the same across real processes.
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_report_and_summary_follow_restarts(tmp_path):
    run_dir = tmp_path / "run"
    with make_logger(run_dir) as log:  # first attempt: steps 1..6, eval at 4, crash after 6
        log.start({"resumed_from_step": 0})
        for step in range(1, 7):
            log.log_step(step_metrics(step, 10.0 - step))
        log.log_eval({"step": 4, "val_loss": 6.5, "val_ppl": math.exp(6.5)})
    with make_logger(run_dir, start_step=4) as log:  # resumed from the step-4 checkpoint, runs to 8
        log.start({"resumed_from_step": 4})
        for step in range(5, 9):
            log.log_step(step_metrics(step, 20.0 - step))
        log.log_eval({"step": 8, "val_loss": 7.0, "val_ppl": math.exp(7.0)})

    summary = summarize(run_dir)
    assert summary["final_step"] == 8
    assert summary["tokens"] == 8 * 256
    assert summary["last_loss"] == 12.0  # the resumed attempt's step 8, not a first-attempt value
    assert summary["best_val_loss"] == 6.5 and summary["last_val_loss"] == 7.0
    assert summary["val_ppl"] == pytest.approx(math.exp(7.0))
    assert summary["mean_tokens_per_s"] == pytest.approx(6500.0)  # steps 5..8 of 1..8
    assert summary["mean_mfu"] == pytest.approx(0.065)
    assert summary["restarts"] == 1

    png = make_report(run_dir)
    assert png == run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_needs_a_metrics_file(tmp_path):
    with pytest.raises(UserError, match="no metrics file"):
        make_report(tmp_path / "missing")
    with pytest.raises(UserError, match="no metrics file"):
        summarize(tmp_path / "missing")


def test_report_needs_logged_steps(tmp_path):
    run_dir = tmp_path / "run"
    with make_logger(run_dir) as log:
        log.start({"resumed_from_step": 0})
    with pytest.raises(UserError, match="no logged steps"):
        make_report(run_dir)
