"""The one base class of errors meant for the user.

A `UserError` carries its exit code and a one-line message that names the problem and the fix;
the command line prints it on stderr and exits with that code, without a traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1  # something the user can fix: paths, network, data, checkpoints
EXIT_USAGE = 2  # config, usage, or joining a run that trains something else


class UserError(Exception):
    """A one-line, user-facing error; `exit_code` is what the command line exits with."""

    exit_code: int = EXIT_FAILURE


class UsageError(UserError):
    """Wrong configuration or usage: the command as given cannot work (exit code 2)."""

    exit_code = EXIT_USAGE
