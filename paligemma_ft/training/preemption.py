"""Stopping on SIGTERM and SIGINT without losing steps: preemptible VMs, Kubernetes and SLURM send SIGTERM (then
SIGKILL after a grace period); Ctrl-C sends SIGINT.

The first signal only sets a flag (`StopSignals.requested`): the trainer finishes the step in flight, saves a
checkpoint, waits for it and raises `Stopped`, which exits with 128 + the signal number (143, 130) and one line,
no traceback. The first signal also gives both signals back to the system's default action, so a second one ends
the process at once (the checkpoint being written is then abandoned and the previous one restores, as after
SIGKILL).
"""

from __future__ import annotations

import signal
import threading
import types
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """A run that stopped on a signal after saving its checkpoint; `code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class StopSignals:
    """A context manager that turns the first SIGTERM / SIGINT into a request to stop (see the module docstring).

    Outside the main thread (where Python cannot install handlers) it does nothing and `requested` stays None.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        self.requested = signum
        for s in SIGNALS:  # A second signal ends the process at once (the system's default action).
            signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        print(
            f"\n{name} received: stopping after the current step and its checkpoint ({name} again stops at once).",
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
