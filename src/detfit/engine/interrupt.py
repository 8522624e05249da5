"""SIGTERM and Ctrl-C as a request to stop after the current step, not as a crash.

The handler only records the signal (as Lightning Fabric and Detectron2 do): the loop checks the
flag between steps, every rank agrees on it in the step's reduction, the checkpoint is written
and the run exits with one line saying how to resume. A second signal aborts at once.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Ctrl-C under torchrun reaches a worker twice within milliseconds (from the terminal, and
# forwarded by torchrun): only a signal this long after the first one is a person's second.
SECOND_SIGNAL_AFTER_S = 1.0


class StopRequest:
    """While entered, the first SIGTERM/SIGINT sets :attr:`signum`; the second raises
    ``KeyboardInterrupt`` wherever the main thread is."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at >= SECOND_SIGNAL_AFTER_S:  # a second one: stop waiting
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
