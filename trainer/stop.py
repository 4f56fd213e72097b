"""Stop signals: SIGTERM and SIGUSR1 (what Slurm sends ahead of a time limit or preemption) are remembered, and the
loop checkpoints at the end of the current step and exits 0. Installed by the CLI before the slow imports of a
start-up, so a signal during start-up ends the run before its first step, with a line, rather than killing it
silently. No torch here: importing this module must be fast.
"""

from __future__ import annotations

import signal


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can checkpoint at the end of the current step and exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        """Give the signals back to whoever handled them before the run (a script calling train())."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
