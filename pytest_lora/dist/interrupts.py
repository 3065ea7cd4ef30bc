"""Stopping a run: SIGTERM ends it as Ctrl-C does, and no second signal cuts the writing of its results.

pytest turns Ctrl-C into an orderly end: the run is recorded ``interrupted`` and its JSON and
tables are written from the records so far. SIGTERM (a CI job's timeout, ``kill``, a batch
scheduler's preemption) would end the process where it stands, leaving the run ``running``
forever and no tables; and a second Ctrl-C while pytest handled the first could cut the writing
of the results half-way.

So, from the session's start to its end (``install``, ``restore``), in the main thread:

- the first SIGINT or SIGTERM raises ``KeyboardInterrupt``, as Ctrl-C does: pytest stops the run
  and the plugin writes its results (the signal is recorded as the run's ``stopped_by``);
- a later one, or any while the results are written (``writing``), is held: a line says so and
  the writing goes on;
- the third raises at once, for a run that hangs.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ESCAPE = 3  # the signal that stops at once, whatever is being written


class Interrupts:
    """The run's handler of SIGINT and SIGTERM, and the signals it received."""

    def __init__(self) -> None:
        self.received: list[str] = []  # the names of the signals, in order
        self._writing = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # pragma: no cover - signals reach the main thread only
            return
        for number in SIGNALS:
            self._previous[number] = signal.getsignal(number)
            signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    @property
    def first(self) -> str | None:
        return self.received[0] if self.received else None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """While the results are written, signals are held (up to the third)."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        self.received.append(name)
        if len(self.received) >= ESCAPE or (len(self.received) == 1 and not self._writing):
            raise KeyboardInterrupt(name)
        sys.stderr.write(f"\npytest-lora: {name} held until the results are written (a third signal stops at once)\n")
