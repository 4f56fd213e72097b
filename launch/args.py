"""Argument types and defaults shared by `launch local` (launch/cli.py) and `launch slurm` (launch/slurm.py).

Each type function raises argparse.ArgumentTypeError with a message that names the expected type in words, so
argparse reports e.g. "argument --nodes: 'abc' is not a positive integer (e.g. 2)" rather than
"invalid _positive_int value: 'abc'".
"""

from __future__ import annotations

import argparse

DEFAULT_GRACE_S = 300  # seconds the ranks get to checkpoint after a stop signal before they are killed
DEFAULT_SIGNAL_S = 300  # seconds before a Slurm time limit that the job is warned with USR1


def _integer(text: str, what: str, example: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (e.g. {example})")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, "a positive integer", "2", 1)


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, "a non-negative integer", "0", 0)


def _host_port(text: str) -> tuple[str, int]:
    """argparse type: HOST:PORT (IPv6 hosts in brackets, e.g. [::1]:29500)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. node001:29500)")
    return host, int(port)
