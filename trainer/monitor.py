"""Run metrics out of the training loop: metrics.jsonl, Weights & Biases, and a progress bar or plain log lines.

Every rank builds a MetricsLogger so the loop needs no rank checks; only the main rank writes, prints or talks to
W&B. metrics.jsonl is the record of the run (the report is drawn from it); W&B is optional.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import netrc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tqdm import tqdm

from trainer.errors import UserError

if TYPE_CHECKING:
    from typing_extensions import Self

WANDB_MODES = ("online", "offline", "disabled")


def to_json_value(value: Any) -> Any:
    """`value` made strict-JSON-safe: non-finite floats become None, tensors/numpy scalars plain numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    item = getattr(value, "item", None)  # one-element torch tensors and numpy scalars
    if callable(item):
        try:
            return to_json_value(item())
        except (ValueError, RuntimeError, TypeError):
            pass
    return str(value)


def wandb_api_key_available() -> bool:
    """Whether W&B credentials exist: WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, or a netrc entry for the W&B host.

    wandb 0.31 keeps its own lookup in a private module (wandb.sdk.lib.wbauth), so this checks the same public
    sources directly instead of depending on it.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = Path(os.environ.get("NETRC", Path.home() / (".netrc" if os.name != "nt" else "_netrc")))
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS, or '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def _format_number(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or 'n/a' for missing / non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _format_rate(tokens_per_s: Any) -> str:
    """Tokens per second as a short human string (12.3k, 1.2M)."""
    if tokens_per_s is None or not math.isfinite(tokens_per_s):
        return "n/a"
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens_per_s >= threshold:
            return f"{tokens_per_s / threshold:.3g}{suffix}"
    return f"{tokens_per_s:.3g}"


@dataclass
class Throughput:
    """Time, tokens and data wait accumulated between two logged steps."""

    time: float = 0.0
    tokens: int = 0
    data_wait: float = 0.0
    steps: int = 0

    def add(self, seconds: float, tokens: int, data_wait: float) -> None:
        self.time, self.tokens = self.time + seconds, self.tokens + tokens
        self.data_wait, self.steps = self.data_wait + data_wait, self.steps + 1

    def take(self) -> dict:
        """Averages over the window, which then starts again."""
        out = {
            "tokens_per_s": self.tokens / self.time,
            "step_time_s": self.time / self.steps,
            "data_wait_s": self.data_wait / self.steps,
        }
        self.time, self.tokens, self.data_wait, self.steps = 0.0, 0, 0.0, 0
        return out


class MetricsLogger:
    """Writes run metrics on the main rank: one JSON line per event, W&B logging, and a progress display.

    The progress display is a tqdm bar on a terminal; when stderr is not a TTY (CI, files, Slurm logs) each logged
    step prints one plain line with an ETA instead, so progress stays readable in log files. progress=False turns
    both off (metrics.jsonl, W&B and eval/text lines are unaffected). On other ranks every method is a no-op.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        is_main: bool,
        total_steps: int,
        start_step: int,
        wandb_mode: str,
        wandb_project: str | None,
        wandb_entity: str | None,
        run_name: str,
        config: dict,
        wandb_run_id: str | None,
        progress: bool = True,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise UserError(f"log.wandb.mode={wandb_mode!r} is not valid; use one of {', '.join(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_step = start_step
        self._wandb_run_id = wandb_run_id
        self._wandb_run: Any = None
        self._wandb_first_step = 0  # a resumed online W&B run refuses steps below the last one it holds
        self._bar: tqdm | None = None
        self._file: IO[str] | None = None
        self._plain_lines = False
        self._t_start = time.perf_counter()
        self._eta_origin: tuple[float, int] | None = None
        self._closed = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = self._open_metrics_file(self.run_dir / "metrics.jsonl")
        if progress and sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        else:
            self._plain_lines = progress
        if wandb_mode != "disabled":
            self._init_wandb(wandb_mode, wandb_project, wandb_entity, run_name, config)

    @staticmethod
    def _open_metrics_file(path: Path) -> IO[str]:
        """Open metrics.jsonl for appending, first ending a line torn by a crash so the next line parses."""
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                torn = existing.read(1) != b"\n"
        handle = path.open("a", encoding="utf-8")
        if torn:
            handle.write("\n")
        return handle

    def _init_wandb(self, mode: str, project: str | None, entity: str | None, name: str, config: dict) -> None:
        """Start (or resume, given a saved id) the W&B run under run_dir; online without credentials goes offline."""
        try:
            import wandb
        except ImportError:
            self.print(
                f"W&B: log.wandb.mode={mode} but wandb is not installed (pip install 'trainer[wandb]'); "
                "logging to metrics.jsonl only"
            )
            return
        if mode == "online" and not wandb_api_key_available():
            self.print(
                "W&B: no API key (WANDB_API_KEY or ~/.netrc); logging offline under "
                f"{self.run_dir / 'wandb'} -- upload later with `wandb sync`"
            )
            mode = "offline"
        self._wandb_run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            config=to_json_value(config),
            dir=str(self.run_dir),
            id=self._wandb_run_id,
            resume="allow",
            mode=mode,
            # quiet: no run summary table in the console; console off: W&B does not wrap stdout/stderr.
            settings=wandb.Settings(quiet=True, console="off"),
        )
        self._wandb_run_id = self._wandb_run.id
        if mode == "online" and self._wandb_run.resumed:
            self._wandb_first_step = self._wandb_run.step

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run id to save in checkpoints, so a resumed run continues the same W&B run."""
        return self._wandb_run_id

    def _write(self, record: dict) -> None:
        """Append one strict-JSON line and flush it, so a crash loses at most the line being written."""
        if self._file is None:
            return
        self._file.write(json.dumps(to_json_value(record), allow_nan=False) + "\n")
        self._file.flush()

    def _wandb_log(self, data: dict, step: int) -> None:
        """Log to W&B at `step`, skipping steps a resumed W&B run already holds (it would drop them with a warning)."""
        if self._wandb_run is not None and step >= self._wandb_first_step:
            self._wandb_run.log(data, step=step)

    def start(self, record: dict) -> None:
        """Append the {"event": "start", ...} line that opens this (re)start of the run."""
        self._write({"event": "start", "time": round(time.time(), 3), **record})

    def log_step(self, metrics: dict) -> None:
        """Record one training step (metrics carries at least 'step'): JSON line, W&B, progress display."""
        if not self.is_main:
            return
        step = int(metrics["step"])
        self._write({**metrics, "time": round(time.time(), 3)})
        self._wandb_log({k: v for k, v in metrics.items() if k != "step"}, step)
        loss, rate, util = metrics.get("loss"), metrics.get("tokens_per_s"), metrics.get("mfu")
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"loss {_format_number(loss, '.4f')} | {_format_rate(rate)} tok/s | mfu {_format_number(util, '.1%')}",
                refresh=False,
            )
            self._bar.update(max(0, step - self._bar.n))
        elif self._plain_lines:
            now = time.perf_counter()
            if self._eta_origin is None:  # measure the rate from the first logged step: setup/compile excluded
                self._eta_origin = (now, step)
            origin_t, origin_step = self._eta_origin
            done = step - origin_step
            eta = (now - origin_t) / done * (self.total_steps - step) if done > 0 else math.nan
            elapsed = now - self._t_start
            self.print(
                f"step {step}/{self.total_steps} | loss {_format_number(loss, '.4f')} | "
                f"lr {_format_number(metrics.get('lr'), '.2e')} | {_format_rate(rate)} tok/s | "
                f"mfu {_format_number(util, '.1%')} | elapsed {_format_duration(elapsed)} | eta {_format_duration(eta)}"
            )

    def log_eval(self, metrics: dict) -> None:
        """Record an evaluation ({"step", "val_loss", ...}): JSON line, W&B, and one printed line."""
        if not self.is_main:
            return
        step = int(metrics["step"])
        self._write({**metrics, "time": round(time.time(), 3)})
        self._wandb_log({k: v for k, v in metrics.items() if k != "step"}, step)
        parts = [
            f"{k} {_format_number(v, '.4f') if isinstance(v, float) else v}" for k, v in metrics.items() if k != "step"
        ]
        self.print(f"eval step {step} | " + " | ".join(parts))

    def log_text(self, step: int, key: str, text: str) -> None:
        """Record a piece of text (e.g. a generated sample): printed, a {"step", key: text} line, an HTML panel."""
        if not self.is_main:
            return
        self.print(f"[{key} @ step {step}]\n{text}")
        self._write({"step": step, key: text})
        if self._wandb_run is not None:
            import wandb

            self._wandb_log({key: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step)

    def print(self, msg: str) -> None:
        """Print a line on the main rank without breaking the progress bar."""
        if self.is_main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def close(self, exit_code: int = 0) -> None:
        """Close the bar, the metrics file and the W&B run (marked failed for a non-zero exit_code). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
