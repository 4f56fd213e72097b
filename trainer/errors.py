"""Errors the CLI prints as a single line (no traceback): bad user input, and a rank of a job that failed or hung."""


class UserError(Exception):
    """Bad input (config, files, shapes). The message names the problem and the fix, in one line."""


class SharedError(UserError):
    """A UserError every rank of the job raises from one decision (rank 0's, broadcast): only rank 0 prints it."""


class PeerFailure(Exception):
    """Another rank of the job died or stopped answering; the message names it (rank, host, pid, last step)."""
