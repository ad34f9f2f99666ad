"""SIGTERM and SIGINT during training: finish the step, save, say how to resume, exit non-zero.

A cluster scheduler sends SIGTERM before it preempts a job; Ctrl-C sends SIGINT. The first one only sets a
flag that the training loop reads after each step, so the checkpoint it writes holds a consistent state. A
second one (more than two seconds later) stops at once (KeyboardInterrupt), for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its state; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, 128 + signum


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT request a stop instead of killing the process.

    ``requested`` is the first signal's number (0 for none). Outside the main thread signals cannot be caught,
    so nothing is installed there and the defaults stay.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_SECONDS = 2.0

    def __init__(self, announce=print) -> None:
        self.requested = 0
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if time.monotonic() - self._first < self.REPEAT_SECONDS:
                return  # the same stop delivered twice: torchrun forwards the terminal's Ctrl-C to its workers too
            raise KeyboardInterrupt  # a second signal: stop now, without a new checkpoint
        self.requested, self._first = signum, time.monotonic()
        self.announce(
            f"{signal.Signals(signum).name}: finishing this step, then saving (send it again to stop at once)"
        )

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
