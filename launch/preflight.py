"""The config checks of `trainer train`, run by `launch local` and `launch slurm` before any rank starts.

Under torchrun every rank would load the config, fail the same way and print it, followed by torchrun's own report;
under Slurm the job would wait in the queue first. So the launchers call the trainer's own checks
(`trainer.train.check_before_start`: keys and values, the model shape, the layout against the world size the launcher
will start, run.dir) in this process, and a bad config ends in the line `trainer train` would print, exit code 2."""

from __future__ import annotations

import sys


def config_refusal(config: str, overrides: list[str], world: int) -> str | None:
    """The one line `trainer train CONFIG overrides` would fail with on a job of `world` ranks, before it builds
    anything; None when the config passes."""
    from trainer.config import load_config
    from trainer.errors import UserError
    from trainer.train import check_before_start

    try:
        check_before_start(load_config(config, overrides), world)
    except UserError as e:
        return str(e)
    return None


def refuse_bad_config(config: str, overrides: list[str], world: int) -> None:
    """Exits with `error: ...` on stderr (one line) and code 2 when the config would fail `trainer train`."""
    refusal = config_refusal(config, overrides, world)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr, flush=True)
        sys.exit(2)
