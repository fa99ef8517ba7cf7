"""The one error type qvdctl shows to an admin.

Every failure an admin can cause or fix (bad input, a name clash, a VM in the
wrong state, a mount that failed) is raised as ``QvdError`` with a one-line
message. ``cli.main`` prints it as ``Error: <message>`` on stderr and exits 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QvdError(Exception):
    """A failure explained in one line for the admin."""

    def __init__(self, message: str) -> None:
        # Newlines would break the "one line on stderr" contract scripts rely on.
        super().__init__(" ".join(str(message).split()))
