"""The machinery of a run, kept apart from the method: device set-up (device), stop signals
(signals), the one write path (files), checkpoints and resuming (checkpoints), the run's
folders and their locks (run), and what a run shows while it trains (monitors).

Every failure a user can meet is a RunError, whose message is one line naming the file or the
flag; the programs print it and exit non-zero.
"""


class RunError(Exception):
    """A run cannot start or go on; the message is one line for the user."""
