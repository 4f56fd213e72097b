"""`launch local`: start the ranks of a run on this node with torchrun, one process per device (`launch slurm`, in
launch/slurm.py, submits the same as a Slurm job).

    launch local [--nproc-per-node N] [--nnodes N --node-rank R --master HOST:PORT] [--max-restarts K] [--dry-run]
                 -- CONFIG [overrides...]

Single node: torchrun --standalone (it picks a free rendezvous port). Several nodes: run the same command on every
node; --master HOST:PORT is the c10d rendezvous endpoint (a port on node 0; a single node may name one too), which
also lets torchrun restart the whole job when a rank dies (--max-restarts), the ranks resuming from the latest
checkpoint.

What torchrun gets besides the ranks:
- SIGUSR1 (Slurm's warning before a time limit or preemption) in its handled signals: forwarded to the ranks, which
  checkpoint at the end of the step and exit 0, as on SIGTERM (by default torchrun would die of it).
- a shutdown grace period (--grace-period, default 300 s) between forwarding a stop signal and killing the ranks:
  long enough for a sharded checkpoint to be written (torchrun's own default is 30 s).
- TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun otherwise keeps one rendezvous store across restarts, and the ranks
  of a restarted job read the previous attempt's addresses from it and fail to connect (torch 2.13).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from launch.args import DEFAULT_GRACE_S, _host_port, _non_negative_int, _positive_int
from launch.preflight import refuse_bad_config

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def default_nproc_per_node() -> int:
    """One process per visible CUDA GPU, or a single process on a machine without one."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def build_parser() -> argparse.ArgumentParser:
    """The `launch` argument parser (one subcommand: local)."""
    parser = argparse.ArgumentParser(prog="launch", description="Start the ranks of a training run.")
    # launch local: torchrun on this node (or on each node); launch slurm: a Slurm batch job (launch/slurm.py)
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser(
        "local",
        help="run torchrun on this node",
        description="Run `trainer train CONFIG [overrides]` under torchrun on this node.",
    )
    local.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        default=None,
        help="processes on this node (default: number of CUDA GPUs, or 1 without GPUs)",
    )
    local.add_argument("--nnodes", type=_positive_int, default=1, help="number of nodes (default 1)")
    local.add_argument("--node-rank", type=_non_negative_int, default=0, help="rank of this node, 0..nnodes-1")
    local.add_argument("--master", type=_host_port, default=None, help="HOST:PORT of node 0 (needed with --nnodes > 1)")
    local.add_argument(
        "--max-restarts",
        type=_non_negative_int,
        default=0,
        help="times torchrun restarts failed ranks; the trainer resumes from the latest checkpoint",
    )
    local.add_argument(
        "--grace-period",
        type=_positive_int,
        default=DEFAULT_GRACE_S,
        help=f"seconds the ranks get to checkpoint after a stop signal before they are killed (default {DEFAULT_GRACE_S})",
    )
    local.add_argument(
        "--log-dir",
        default=None,
        help="also write each rank's stdout and stderr to files under this directory (torchrun --log-dir --tee 3)",
    )
    local.add_argument("--dry-run", action="store_true", help="print the command and exit")
    local.add_argument("config", help="the run's YAML config")
    local.add_argument("overrides", nargs="*", help="section.key=value overrides")
    local.set_defaults(subparser=local)  # so checks across arguments report under `launch local`
    from launch.slurm import add_parser as add_slurm

    add_slurm(commands)
    return parser


def torchrun_command(
    config: str,
    overrides: list[str],
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master: tuple[str, int] | None = None,
    max_restarts: int = 0,
    grace_period: int = DEFAULT_GRACE_S,
    log_dir: str | None = None,
) -> list[str]:
    """The torchrun argv that runs `trainer train CONFIG overrides...` on this node (run it with LAUNCH_ENV)."""
    cmd = [
        sys.executable,
        "-m",
        "launch.torchrun",  # torchrun, with a one-line report when a rank fails (launch/torchrun.py)
        "--nproc-per-node",
        str(nproc_per_node),
        "--nnodes",
        str(nnodes),
        "--max-restarts",
        str(max_restarts),
        "--signals-to-handle",
        HANDLED_SIGNALS,
        "--shutdown-timeout",
        str(grace_period),
    ]
    if log_dir:  # per-rank files <log_dir>/<run id>/attempt_<k>/<rank>/{stdout,stderr}.log; the console keeps all
        cmd += ["--log-dir", log_dir, "--tee", "3"]
    if master is None:  # one node: torchrun picks a free rendezvous port
        cmd.append("--standalone")
    else:
        host, port = master
        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        cmd += ["--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
        cmd += ["--rdzv-id", f"trainer-{port}"]  # the same on every node of the job
    return cmd + ["-m", "trainer", "train", config, *overrides]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry.parent.name))
    return found


def _die_with(parent: int):
    """A Popen preexec_fn that has Linux SIGKILL the child when `parent` (this launcher) dies, however it dies: the
    agent runs in a session of its own, so nothing else would stop it (and its ranks) after a `kill -9` of the
    launcher. If the launcher is already gone when the request takes effect, the child exits at once."""

    from trainer.lifetime import _prctl, set_parent_death_signal

    _prctl()  # look libc up here, not in the forked child

    def preexec() -> None:
        if set_parent_death_signal(signal.SIGKILL) and os.getppid() != parent:
            os._exit(1)

    return preexec


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run torchrun (`cmd`) and return its exit code, passing signals on so a stop is clean.

    SIGTERM and SIGUSR1 go straight to the ranks (torchrun's children): they checkpoint at the end of the step and
    exit 0, so torchrun ends with success. (Sent to torchrun, it would stop the ranks too, but exit non-zero with a
    traceback of its own.) Ctrl-C (SIGINT) goes to torchrun, which stops the ranks at once. The child gets its own
    session so a Ctrl-C in the terminal reaches it once (through us), not twice, and a parent-death signal so that it
    does not outlive us (trainer/lifetime.py).
    """
    env = {**os.environ, **LAUNCH_ENV}
    die_with_us = _die_with(os.getpid())  # a preexec_fn is safe here: the launcher runs no other threads
    child = subprocess.Popen(cmd, start_new_session=True, env=env, preexec_fn=die_with_us)  # noqa: PLW1509
    interrupted = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is not None:
            return
        if signum == signal.SIGINT:
            interrupted.append(signum)
            child.send_signal(signum)
            return
        ranks = _children(child.pid)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not ranks:  # torchrun has not started them yet
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:  # however torchrun reported its stop, the last line says what happened
        print(
            "launch: interrupted (Ctrl-C): the ranks stopped at once; the same command resumes the run from its last "
            "complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        return 130
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128+N, as shells report it


def main(argv: list[str] | None = None) -> None:
    """Entry point of `launch` / `python -m launch`: print the torchrun command, then (unless --dry-run) run it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "slurm":
        from launch.slurm import main as slurm_main

        return slurm_main(args)
    local: argparse.ArgumentParser = args.subparser
    if args.nnodes > 1 and args.master is None:
        local.error(f"--nnodes {args.nnodes} needs --master HOST:PORT (the address of node 0)")
    if args.node_rank >= args.nnodes:
        local.error(f"--node-rank {args.node_rank} must be below --nnodes {args.nnodes}")
    nproc = args.nproc_per_node or default_nproc_per_node()
    cmd = torchrun_command(
        args.config,
        args.overrides,
        nproc,
        args.nnodes,
        args.node_rank,
        args.master,
        args.max_restarts,
        args.grace_period,
        args.log_dir,
    )
    if not args.dry_run:  # a bad config is refused here, in one line, before torchrun starts any rank
        if not Path(args.config).is_file():
            local.error(f"config file not found: {args.config}")
        refuse_bad_config(args.config, args.overrides, nproc * args.nnodes)
    print(shlex.join([f"{k}={v}" for k, v in LAUNCH_ENV.items()] + cmd), flush=True)
    if args.dry_run:
        return
    sys.exit(run_forwarding_signals(cmd))
