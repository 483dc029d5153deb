"""The machinery of a run, kept apart from the method: device set-up (device), stop signals
(signals), the one write path (files), checkpoints and resuming (checkpoints), the run's
folders and their locks (run), and what a run shows while it trains (monitors).

Every failure a user can meet is a RunError, whose message is one line naming the file or the
flag; the programs print it and exit non-zero.
"""

import sys


class RunError(Exception):
    """A run cannot start or go on; the message is one line for the user."""

    status = 1

    def exit(self, program):
        """End `program` with this line and the error's exit status."""
        if self.status == 1:
            sys.exit(f'{program}: {self}')  # SystemExit carries the line itself
        print(f'{program}: {self}', file=sys.stderr)
        sys.exit(self.status)
