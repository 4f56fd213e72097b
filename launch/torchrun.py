"""torchrun, as `launch local` runs it: `python -m launch.torchrun ARGS` is `torchrun ARGS` except for how a failure
ends. torchrun prints its own Python traceback and a multi-line report when a rank fails or when it is signalled;
the ranks have already said what went wrong (a user error in one line, a failed peer named by rank), so this prints
one line naming the failed ranks and their exit codes, and exits with the first failure's code.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    try:
        run(args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        said = ", ".join(f"rank {rank} (pid {f.pid}) exit code {f.exitcode}" for rank, f in failures)
        print(f"launch: the job failed: {said}; the ranks' own messages are above", file=sys.stderr, flush=True)
        code = failures[0][1].exitcode
        sys.exit(code if 0 < code < 256 else 1)
    except SignalException as e:  # Ctrl-C or a signal to torchrun itself: the ranks were stopped with it
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
