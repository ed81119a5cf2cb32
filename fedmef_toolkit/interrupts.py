"""SIGINT and SIGTERM stop a run like Ctrl-C: the last completed round is checkpointed.

One mechanism for every engine. `stop_on_signals` (used by `fedmef_toolkit.training.run_rounds`,
the one place that runs a run's rounds, for `fedmef train` and `fedmef_toolkit.train()`) installs
handlers for both signals in the main thread:

- ``immediate=True`` (the built-in simulator, whose loop runs in the main thread): the handler
  raises `Interrupted` at once; the round in progress is abandoned and `Simulator.run` checkpoints
  the last completed one (as for Ctrl-C). `immediate` may be a callable asked at each signal: the
  simulator says no while the server folds the round's results into the model (the round then
  ends, is logged, and the loop's `check()` stops the run before the next one).
- ``immediate=False`` (Flower's simulation engine: the main thread runs Flower's runtime and Ray,
  the rounds run in the ServerApp's thread): the handler only records the request; the round loop
  and the Flower engine's polling call `check()`, which raises `Interrupted` in the round's thread,
  so the run stops there with its checkpoint and Flower shuts its runtime and Ray down normally. A
  second signal raises in the main thread at once.

`Interrupted` is a KeyboardInterrupt (everything that handles Ctrl-C handles it) that carries the
signal; `exit_code` is the shell's convention, 128 + signal number (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT or SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    def __reduce__(self):
        return Interrupted, (self.signum,)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_requested = threading.Event()
_signum = signal.SIGINT


def requested() -> bool:
    """Whether a stop was requested (a signal arrived while handlers were installed)."""
    return _requested.is_set()


def check() -> None:
    """Raise `Interrupted` where a stop was requested; called where the run can stop cleanly
    (between rounds, while waiting for clients)."""
    if _requested.is_set():
        raise Interrupted(_signum)


def request(signum: int = signal.SIGINT) -> None:
    """Ask the run to stop, as a signal does (tests, embedding applications)."""
    global _signum
    _signum = signum
    _requested.set()


class _Guard:
    def __init__(self, immediate: bool | Callable[[], bool]):
        self.immediate = immediate
        self.previous: dict[int, object] = {}
        self.active = threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame):
        again = _requested.is_set()
        request(signum)
        if again or (self.immediate() if callable(self.immediate) else self.immediate):
            raise Interrupted(signum)

    def install(self) -> None:
        """(Re)install the handlers; e.g. after `ray.init`, which sets its own for SIGTERM."""
        if not self.active:  # signal handlers can only be set in the main thread
            return
        for s in SIGNALS:
            old = signal.signal(s, self._handle)
            self.previous.setdefault(s, old)

    def restore(self) -> None:
        for s, old in self.previous.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)  # None: set outside Python
        self.previous.clear()


@contextmanager
def stop_on_signals(immediate: bool | Callable[[], bool] = True):
    """SIGINT and SIGTERM stop the run inside the block (see the module's docstring); the
    previous handlers come back after it. Yields the guard (`install()` re-installs)."""
    _requested.clear()
    guard = _Guard(immediate)
    guard.install()
    try:
        yield guard
    finally:
        guard.restore()
        _requested.clear()
