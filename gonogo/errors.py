"""Errors a user can act on.

A ``UserError`` is a mistake in the user's input (a plan, a config, a flag, a path). The CLI
prints its message as one line and exits with code 2; it never shows a traceback for it.
"""


class UserError(Exception):
    """A user's mistake: one line that names the problem and the fix. Exit code 2."""

    exit_code = 2


class StageFailed(Exception):
    """A stage ran but could not produce its result (a rank died, a hang, a timeout).

    This is a finding about the system under test, so the plan records it as a failed stage
    (NO-GO), not as a user error.
    """
