"""A rank dies with the torchrun agent that started it.

`launch local` starts the torchrun agent (`python -m launch.torchrun`) in a session of its own, and torchrun starts
each rank in a session of its own too, so a SIGKILL of the launcher or of the agent reaches no rank: without more,
the ranks of a killed job keep training as orphans (holding the devices, the run lock and the rendezvous ports).
Linux's parent-death signal (prctl PR_SET_PDEATHSIG) closes that gap, one link at a time: `launch local` asks for
SIGKILL when the launcher dies in the agent it starts (launch/cli.py), and each rank calls `follow_parent()` at
start-up to ask for SIGKILL when its agent dies. The ranks' DataLoader workers do the same with their rank
(trainer/data/workers.py: die_with_parent).

PR_SET_PDEATHSIG fires when the parent *thread* that forked the process exits, not only when the parent process
does. torchrun's agent starts the ranks from its main thread (torch 2.13: LocalElasticAgent._start_workers ->
start_processes -> SubprocessHandler's Popen, called from the agent's `run()` on the thread that called it, which
is launch/torchrun.py's main thread; PContext.start() even checks it is on the main thread to install its signal
handlers), and that thread lives as long as the agent, so the signal comes exactly when the agent dies.

This module imports no torch: it runs first thing in every rank.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
AGENT_PID_ENV = "LAUNCH_AGENT_PID"  # set by launch/torchrun.py for the ranks it starts


@functools.cache
def _prctl():
    """libc's prctl, or None off Linux (looked up once: a Popen preexec_fn calls it between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when the thread that forked it exits; False where unsupported."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def follow_parent() -> None:
    """Under a torchrun agent (TORCHELASTIC_RUN_ID or LAUNCH_AGENT_PID set) on Linux: be SIGKILLed when the agent
    dies, and exit at once if it is already gone (it died between starting this process and the request above).
    A no-op elsewhere and outside an agent."""
    agent = os.environ.get(AGENT_PID_ENV, "")
    if not (os.environ.get("TORCHELASTIC_RUN_ID") or agent):
        return
    if not set_parent_death_signal(signal.SIGKILL):
        return
    if agent.isdigit() and os.getppid() != int(agent) and not os.path.exists(f"/proc/{agent}"):
        print(
            f"error: the torchrun agent (pid {agent}) that started this rank is gone; stopping (run the launch "
            f"command again to resume from the latest complete checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
