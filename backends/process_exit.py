"""What a child process's exit status says, in words for logs and errors."""

from __future__ import annotations

import signal


def exit_reason(returncode: int) -> str:
    """`SIGKILL`, `SIGILL`, ... for a signal; `exit code N` otherwise."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
