"""SIGINT and SIGTERM, one way for every program.

A program ends on a stop signal with one line and exit status 128 + the signal's number (130
after SIGINT, 143 after SIGTERM), through os._exit: no traceback, and no interpreter shutdown
with nnabla half imported or a forward pass half run (a KeyboardInterrupt raised inside one of
nnabla's calls into Python comes out as a SystemError, and such ends have crashed). Work that
has something to finish (a checkpoint, the current image) asks for a StopRequest instead: the
first signal is recorded for the program to act on, a second one ends at once.
"""

import os
import signal
import sys
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum):
    return 128 + signum


def say(text):
    """One line on stderr, on a line of its own (a progress bar may hold the current one)."""
    os.write(2, f'\n{os.path.basename(sys.argv[0])}: {text}\n'.encode())


def exit_at_once(signum, frame=None, then=''):
    say(f'stopped by {signal.Signals(signum).name}{then}')
    os._exit(exit_status(signum))


def handle_stop_signals(handler):
    """Make `handler` the handler of SIGINT and SIGTERM. A signal that a shell set to be ignored
    (a background job's SIGINT) stays ignored."""
    for stop_signal in STOP_SIGNALS:
        if signal.getsignal(stop_signal) is not signal.SIG_IGN:
            signal.signal(stop_signal, handler)


class StopRequest:
    """While `deferring`, the first stop signal is recorded in `received` (its number) with the
    line `then`, for the program to finish its step and stop; at any other moment, and for a
    second signal, the program ends at once, after calling `before_exit` (releasing its locks),
    with `at_once` added to its line."""

    def __init__(self, then='stopping after this step', before_exit=(), at_once=''):
        self.then, self.before_exit, self.at_once = then, list(before_exit), at_once
        self.deferring = False
        self.received = None
        self.held_signal = None  # one that came within held(), acted on at its end
        self.holding = False

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        handle_stop_signals(self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def name(self):
        return signal.Signals(self.received).name

    @contextmanager
    def held(self):
        """Within it a stop signal waits for its end, so that what it makes (a lock file, say)
        is whole when before_exit sees it."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if self.held_signal is not None:
                signum, self.held_signal = self.held_signal, None
                self.handle(signum, None)

    def handle(self, signum, frame):
        if self.holding:
            self.held_signal = self.held_signal or signum
            return
        if self.deferring and self.received is None:
            self.received = signum
            say(f'{self.name}: {self.then} (again: at once)')
            return
        for callback in self.before_exit:
            callback()
        exit_at_once(signum, then=self.at_once if self.deferring else '')
