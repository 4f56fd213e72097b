"""A run's story from its metrics.jsonl: a PNG of loss, learning rate and throughput, and a summary dict.

metrics.jsonl holds every (re)start of a run. A start line with `resumed_from_step = R` means the lines after it
replay the run from step R, so lines of earlier attempts past step R are dropped; otherwise a later line simply
replaces an earlier one for the same step and key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, PercentFormatter

from trainer.errors import UserError

Series = dict[str, dict[int, float]]


def load_metrics(run_dir: Path) -> tuple[list[dict], Series]:
    """The start records and, per metric key, {step: value} after applying restarts (see the module docstring)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics file at {path}; pass the run.dir of a run that has logged at least one step")
    starts: list[dict] = []
    series: Series = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if not isinstance(record, dict):
            continue
        if record.get("event") == "start":
            starts.append(record)
            if "resumed_from_step" in record:
                resumed = int(record["resumed_from_step"] or 0)
                for values in series.values():
                    for step in [s for s in values if s > resumed]:
                        del values[step]
            continue
        if "step" not in record:
            continue
        step = int(record["step"])
        for key, value in record.items():
            if key in ("step", "time", "event"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
            elif value is None:
                series.setdefault(key, {})[step] = math.nan
    if not series.get("loss") and not series.get("val_loss"):
        raise UserError(f"{path} has no logged steps yet; run training for at least log.every steps first")
    return starts, series


def _xy(series: Series, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted steps and values of one metric (empty arrays when it was never logged)."""
    values = series.get(key, {})
    steps = sorted(values)
    return np.array(steps, dtype=float), np.array([values[s] for s in steps], dtype=float)


def _interp_linear_ends(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp that continues the first/last segment's slope past the ends (axis limits reach beyond the data)."""
    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    low_slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
    high_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * low_slope, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * high_slope, y)


def _finite(values: np.ndarray) -> np.ndarray:
    """Only the finite entries of `values`."""
    return values[np.isfinite(values)]


def summarize(run_dir: Path) -> dict[str, Any]:
    """Headline numbers of a run: final step and tokens, last loss, best/last val loss, throughput and MFU.

    Means of tokens_per_s and mfu are over the last half of the logged steps, past warm-up and compilation.
    Values never logged (or never finite) are None.
    """
    starts, series = load_metrics(run_dir)

    def last(key: str) -> float | None:
        _, values = _xy(series, key)
        values = _finite(values)
        return float(values[-1]) if len(values) else None

    def late_mean(key: str) -> float | None:
        _, values = _xy(series, key)
        values = _finite(values[len(values) // 2 :])
        return float(values.mean()) if len(values) else None

    steps = sorted({s for values in series.values() for s in values})
    val = _finite(_xy(series, "val_loss")[1])
    tokens = last("tokens")
    return {
        "final_step": steps[-1] if steps else None,
        "tokens": int(tokens) if tokens is not None else None,
        "last_loss": last("loss"),
        "best_val_loss": float(val.min()) if len(val) else None,
        "last_val_loss": float(val[-1]) if len(val) else None,
        "val_ppl": last("val_ppl"),
        "val_accuracy": last("val_accuracy"),
        "mean_tokens_per_s": late_mean("tokens_per_s"),
        "mean_mfu": late_mean("mfu"),
        "restarts": max(0, len(starts) - 1),
    }


def make_report(run_dir: Path) -> Path:
    """Draw run_dir/report.png: loss (train and val, tokens on the top axis), LR, throughput and MFU, grad norm."""
    run_dir = Path(run_dir)
    _, series = load_metrics(run_dir)
    summary = summarize(run_dir)
    fig = Figure(figsize=(12, 8), layout="constrained")
    ax_loss, ax_lr, ax_speed, ax_grad = fig.subplots(2, 2).flat

    steps, loss = _xy(series, "loss")
    ax_loss.plot(steps, loss, label="train loss", linewidth=1)
    val_steps, val_loss = _xy(series, "val_loss")
    if len(val_steps):
        ax_loss.plot(val_steps, val_loss, "o-", label="val loss", markersize=3)
    ax_loss.set(xlabel="step", ylabel="loss")
    ax_loss.legend()
    token_steps, tokens = _xy(series, "tokens")
    if len(token_steps) >= 2 and np.all(np.diff(tokens) > 0):  # step <-> tokens is monotonic: a second x axis
        top = ax_loss.secondary_xaxis(
            "top",
            functions=(
                lambda s: _interp_linear_ends(s, token_steps, tokens),
                lambda t: _interp_linear_ends(t, tokens, token_steps),
            ),
        )
        top.set_xlabel("tokens")
        top.xaxis.set_major_formatter(EngFormatter())
    tokens_text = f", {summary['tokens']:,} tokens" if summary["tokens"] is not None else ""
    ax_loss.set_title(f"loss (step {summary['final_step']}{tokens_text})")

    ax_lr.plot(*_xy(series, "lr"), linewidth=1)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    ax_speed.plot(*_xy(series, "tokens_per_s"), color="tab:blue", linewidth=1)
    ax_speed.set(xlabel="step", ylabel="tokens/s", title="throughput and MFU")
    ax_speed.yaxis.set_major_formatter(EngFormatter())
    ax_speed.tick_params(axis="y", labelcolor="tab:blue")
    ax_mfu = ax_speed.twinx()
    ax_mfu.plot(*_xy(series, "mfu"), color="tab:orange", linewidth=1)
    ax_mfu.set_ylabel("MFU", color="tab:orange")
    ax_mfu.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax_mfu.tick_params(axis="y", labelcolor="tab:orange")

    ax_grad.plot(*_xy(series, "grad_norm"), linewidth=1, color="tab:green")
    ax_grad.set(xlabel="step", ylabel="grad norm", title="gradient norm")

    fig.suptitle(run_dir.name)
    out = run_dir / "report.png"
    fig.savefig(out, dpi=100)
    return out
