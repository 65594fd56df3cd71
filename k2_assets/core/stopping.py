"""Ctrl-C and SIGTERM for the long-running `k2` commands: say what stops, stop it, and stop at once on a second signal."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopper:
    """A signal handler: the first signal says what is stopping and calls `stop`; a second one exits at once."""

    def __init__(self, command: str, what: str, stop: Callable[[], None], force: Callable[[], None] | None = None):
        self.command, self.what, self._stop, self._force = command, what, stop, force
        self.requested = False

    def __call__(self, signum: int = signal.SIGINT, _frame=None) -> None:
        if self.requested:
            print(f"{self.command}: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            if self._force is not None:
                self._force()
            os._exit(130)
        self.requested = True
        name = signal.Signals(signum).name
        print(f"{self.command}: {name}: stopping {self.what}; {name} again forces it", file=sys.stderr, flush=True)
        self._stop()

    def install(self, loop=None) -> Stopper:
        """Handle SIGINT and SIGTERM in this thread, or in an asyncio loop."""
        for signum in SIGNALS:
            if loop is not None:
                loop.add_signal_handler(signum, self, signum)
            else:
                signal.signal(signum, self)
        return self
