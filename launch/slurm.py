"""`launch slurm`: render `slurm/train.sbatch` for a run and submit it with sbatch (or print it with --dry-run).

    launch slurm --nodes N [--gpus-per-node G | --nproc-per-node P] [--partition P] [--account A] [--qos Q]
                 [--time T] [--constraint C] [--cpus-per-task C] [--sbatch LINE ...] [--signal-seconds S]
                 [--max-restarts K] [--grace-period S] [--dry-run] -- CONFIG [overrides...]

The job runs `launch local` once per node (srun), torchrun under it, with a c10d rendezvous on the first node of the
allocation. The run directory (and with it the W&B run id, kept in the checkpoints) is the config's, shared by every
restart; the batch log is `<log dir>/<job name>-<job id>.out`, each node's
`<job name>-<job id>-node<i>-<host>.out`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

from launch.args import DEFAULT_GRACE_S, DEFAULT_SIGNAL_S, _non_negative_int, _positive_int

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
TIME_FORMATS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
# Slurm's time limit formats (sbatch --time): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds
_TIME = re.compile(
    r"(?:(?P<days>[0-9]+)-(?P<dh>[0-9]+)(?::(?P<dm>[0-9]+)(?::(?P<ds>[0-9]+))?)?|(?P<a>[0-9]+)(?::(?P<b>[0-9]+)(?::(?P<c>[0-9]+))?)?)"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def time_limit_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit (`--time`), None for no limit ("UNLIMITED", "INFINITE", or 0 as Slurm reads
    it); ValueError for anything that is not one of Slurm's formats."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a Slurm time limit ({TIME_FORMATS})")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "days" in g:
        seconds = ((g["days"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    elif "c" in g:  # hours:minutes:seconds
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    elif "b" in g:  # minutes:seconds
        seconds = g["a"] * 60 + g["b"]
    else:  # minutes
        seconds = g["a"] * 60
    return seconds or None  # sbatch: "A time limit of zero requests that no time limit be imposed"


def _script_values(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(option, value) for every value given on the command line that `render` writes into the batch script."""
    values = [(f"--{name}", getattr(args, name)) for name in ("partition", "account", "qos", "time", "constraint")]
    values += [("--sbatch", v) for v in args.sbatch]
    values += [("--log-dir", args.log_dir), ("the config path", args.config)]
    values += [("override", o) for o in args.overrides]
    return [(option, value) for option, value in values if value is not None]


def check(args: argparse.Namespace) -> str | None:
    """The first problem with what `args` would write into the batch script, in one line; None if there is none."""
    for option, value in _script_values(args):
        if _CONTROL.search(value):
            return (
                f"{option} {value!r} contains a control character (a newline, tab, ...); it would corrupt the batch "
                f"script: give it on one line, without control characters"
            )
    if args.time is not None:
        try:
            limit = time_limit_seconds(args.time)
        except ValueError:
            return f"--time {args.time} is not a Slurm time limit ({TIME_FORMATS})"
        if limit is not None and args.signal_seconds >= limit:
            return (
                f"--signal-seconds {args.signal_seconds} is not below the time limit --time {args.time} ({limit} s): "
                f"the job would be told to stop as soon as it starts; give a smaller --signal-seconds or a longer "
                f"--time"
            )
    return None


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "slurm",
        help="submit the run as a Slurm batch job",
        description="Render slurm/train.sbatch for CONFIG and submit it with sbatch.",
    )
    p.add_argument("--nodes", type=_positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=_non_negative_int, default=0, help="GPUs per node (default 0: CPU)")
    p.add_argument(
        "--nproc-per-node", type=_positive_int, default=None, help="ranks per node (default: --gpus-per-node, or 1)"
    )
    for name, what in (
        ("partition", "partition"),
        ("account", "account to charge"),
        ("qos", "quality of service"),
        ("time", "time limit, e.g. 1-00:00:00"),
        ("constraint", "node features, e.g. a100"),
    ):
        p.add_argument(f"--{name}", default=None, help=what)
    p.add_argument("--cpus-per-task", type=_positive_int, default=None, help="CPUs for each node's task")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="an extra sbatch option, e.g. --sbatch=--mem=0 --sbatch=--exclusive (repeatable)",
    )
    p.add_argument(
        "--signal-seconds",
        type=_positive_int,
        default=DEFAULT_SIGNAL_S,
        help=f"seconds before the time limit (or at preemption) that the job is warned (default {DEFAULT_SIGNAL_S}; "
        f"Slurm may warn up to 60 s earlier)",
    )
    p.add_argument("--max-restarts", type=_non_negative_int, default=0, help="torchrun restarts after a rank fails")
    p.add_argument("--grace-period", type=_positive_int, default=DEFAULT_GRACE_S, help="see launch local")
    p.add_argument("--log-dir", default=None, help="where the logs go (default: RUN_DIR/logs)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script and exit")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(subparser=p)
    return p


def ranks_per_node(args: argparse.Namespace) -> int:
    """Ranks the job starts on each node: --nproc-per-node, else one per GPU, else one."""
    return args.nproc_per_node or args.gpus_per_node or 1


def render(args: argparse.Namespace) -> tuple[str, Path]:
    """The batch script for `args`, and the log directory."""
    from trainer.config import load_config
    from trainer.errors import UserError
    from trainer.train import check_before_start

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, not in the queue
    run_dir = cfg.run_dir.resolve()
    for key, value in (("run.name", f"{cfg.run.name}"), ("run.dir", str(run_dir))):
        if _CONTROL.search(value):
            what = " (the job name)" if key == "run.name" else " (the log and checkpoint paths)"
            raise UserError(
                f"{key} {value!r}{what} contains a control character (a newline, tab, ...); it would corrupt the "
                f"batch script: give one without control characters"
            )
    check_before_start(cfg, args.nodes * ranks_per_node(args))  # as `trainer train` would on the job's ranks
    log_dir = Path(args.log_dir).resolve() if args.log_dir else run_dir / "logs"
    lines = [f"#SBATCH --cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    if args.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    for name in ("partition", "account", "qos", "time", "constraint"):
        if getattr(args, name):
            lines.append(f"#SBATCH --{name}={getattr(args, name)}")
    lines += [f"#SBATCH {opt}" for opt in args.sbatch]
    train_args = [str(Path(args.config).resolve()), *args.overrides]
    values = {
        "job_name": cfg.run.name,
        "nodes": str(args.nodes),
        "log_dir": str(log_dir),
        "signal_seconds": str(args.signal_seconds),
        "sbatch_lines": "\n".join(lines),
        "workdir": shlex.quote(str(Path.cwd())),
        "python": shlex.quote(sys.executable),
        "nproc_per_node": str(ranks_per_node(args)),
        "max_restarts": str(args.max_restarts),
        "grace_period": str(args.grace_period),
        "train_args": shlex.join(train_args),
        "log_dir_quoted": shlex.quote(str(log_dir)),
        "run_dir_quoted": shlex.quote(str(run_dir)),
        "steps": str(cfg.train.steps),
    }
    script = TEMPLATE.read_text()
    for key, value in values.items():
        script = script.replace("{{" + key + "}}", value)
    return script, log_dir


def main(args: argparse.Namespace) -> None:
    from trainer.errors import UserError
    from trainer.writable import check_writable_dir

    problem = check(args)
    if problem:
        args.subparser.error(problem)
    try:
        script, log_dir = render(args)
        if args.log_dir and not args.dry_run:  # (run.dir, which holds the default logs/, is checked with the config)
            check_writable_dir(log_dir, "--log-dir")
    except UserError as e:  # the line `trainer train` would print in the job's log, printed here instead
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if args.dry_run:
        print(script, end="")
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    name = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH --job-name="))
    path = log_dir / f"{name}.sbatch"
    path.write_text(script)
    r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"launch slurm: sbatch failed: {r.stderr.strip() or r.stdout.strip()}")
    job = r.stdout.strip().split(";")[0]
    print(
        f"submitted job {job} ({args.nodes} node(s)); script {path}\n"
        f"  logs:   {log_dir}/{name}-{job}.out (the job), {log_dir}/{name}-{job}-node<i>-<host>.out (each node)\n"
        f"  watch:  squeue -j {job}; tail -f {log_dir}/{name}-{job}-*.out\n"
        f"  cancel: scancel {job} (or scancel --signal=USR1 --batch {job} to checkpoint, stop and requeue)",
        flush=True,
    )
