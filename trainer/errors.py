"""The one exception type for bad user input: the CLI prints its message as a single line and exits non-zero."""


class UserError(Exception):
    """Bad input (config, files, shapes). The message names the problem and the fix, in one line."""
