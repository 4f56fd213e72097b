"""torchrun, as `launch local` runs it: `python -m launch.torchrun ARGS` is `torchrun ARGS` except for how a failure
ends. torchrun prints its own Python traceback and a multi-line report when a rank fails or when it is signalled;
the ranks have already said what went wrong (a user error in one line, a failed peer named by rank), so this prints
one line naming the failed ranks and their exit codes, and exits with the first failure's code. A signal to the
agent itself likewise ends in one line saying what torchrun did with it.

The ranks learn the agent's pid from LAUNCH_AGENT_PID: each rank has Linux kill it when the agent dies
(trainer/lifetime.py), so a `kill -9` of the agent does not leave them training as orphans.
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    os.environ["LAUNCH_AGENT_PID"] = str(os.getpid())  # the ranks' environment: they die with this process
    try:
        run(args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        said = ", ".join(f"rank {rank} (pid {f.pid}) exit code {f.exitcode}" for rank, f in failures)
        print(f"launch: the job failed: {said}; the ranks' own messages are above", file=sys.stderr, flush=True)
        code = failures[0][1].exitcode
        sys.exit(code if 0 < code < 256 else 1)
    except SignalException as e:  # Ctrl-C or a signal to torchrun itself: the ranks were stopped with it
        grace = args.shutdown_timeout
        if grace is None:  # torchrun's own default
            grace = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        print(signal_report(int(e.sigval), grace), file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))


def signal_report(signum: int, grace_s: int) -> str:
    """The line the agent ends with after a stop signal. torch 2.13's agent (LocalElasticAgent.run) catches it as a
    SignalException and shuts the workers down with the *same* signal, sent to each rank's process group (the rank
    and its data workers), then waits up to --shutdown-timeout seconds in all (launch's --grace-period) for them to
    exit before it SIGKILLs what is left."""
    name = signal.Signals(signum).name
    if signum in (signal.SIGTERM, signal.SIGUSR1):
        what = "they checkpoint at the end of the step and exit"
    elif signum == signal.SIGINT:
        what = "they stop at once, without a checkpoint"
    else:  # SIGHUP, SIGQUIT: the trainer does not handle them
        what = "it ends them at once, without a checkpoint"
    return (
        f"launch: the torchrun agent got {name} and passed {name} to the ranks ({what}; any still running after "
        f"{grace_s} s are killed); the same command resumes from the latest complete checkpoint"
    )


if __name__ == "__main__":
    main()
