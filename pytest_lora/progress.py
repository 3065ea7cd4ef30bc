"""A progress line for work that takes long inside one test: which test, what, how far, and how
many tests remain.

Training the forgetting suite's base takes half a minute on a CPU, and a big model's timed steps
minutes on a GPU; pytest shows nothing until the test ends. A ``Progress`` rewrites one terminal
line in place (``\\r``) at most twice a second, from the second second on, through pytest's
terminal writer with capturing suspended (as pytest's live logging does). It writes nothing when
the output is not a terminal (CI logs, files, xdist workers).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable

DELAY_S = 2.0  # tasks shorter than this show nothing
INTERVAL_S = 0.5


class Progress:
    """Call it with the number of steps done; use it as a context manager around the task."""

    def __init__(self, config: Any, test: str, label: str, total: int, remaining: int, clock: Callable[[], float] = time.monotonic):
        self.config, self.test, self.label, self.total, self.remaining = config, test, label, total, remaining
        self.clock = clock
        self.started = clock()
        self.shown_at: float | None = None
        self.reporter = config.pluginmanager.get_plugin("terminalreporter")
        self.enabled = self.reporter is not None and bool(getattr(self.reporter, "isatty", False))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __call__(self, done: int) -> None:
        now = self.clock()
        if not self.enabled or now - self.started < DELAY_S:
            return
        if self.shown_at is not None and now - self.shown_at < INTERVAL_S and done < self.total:
            return
        self._write(self.text(done, now), first=self.shown_at is None)
        self.shown_at = now

    def text(self, done: int | None, now: float) -> str:
        """The line; ``done`` None for a call that counts no steps (``Waiting``)."""
        tests = f"{self.remaining} more test{'s' if self.remaining != 1 else ''}" if self.remaining else "last test"
        count = "" if done is None else f" {done}/{self.total}"
        elapsed = now - self.started
        # the time left at the pace so far: each step of a fine-tuning run costs the same
        left = f", about {elapsed / done * (self.total - done):.0f} s left" if done and done < self.total else ""
        return f"[lora] {self.label}{count} ({elapsed:.0f} s{left}; {tests}) {self.test}"

    def close(self) -> None:
        """Leave the last line standing, and have pytest start its next result on a new line."""
        if self.shown_at is not None:
            self.reporter.currentfspath = None  # pytest writes the file name again before the next result
            self.shown_at = None

    def _write(self, text: str, first: bool) -> None:
        width = max(self.config.get_terminal_writer().fullwidth - 1, 20)
        line = text[:width].ljust(width)
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            self.reporter.write(("\n" if first else "\r") + line, flush=True)


class Waiting:
    """A line for one long call that reports nothing while it runs (building an 8B base on a GPU
    takes tens of seconds): a timer shows it once the call has taken ``DELAY_S``, so the many short
    calls of a CPU run show nothing. Use it as a context manager around the call."""

    def __init__(self, progress: Progress, delay: float = DELAY_S):
        self.progress = progress
        self.timer = threading.Timer(delay, self._show)
        self.timer.daemon = True
        self.lock = threading.Lock()
        self.done = False

    def __enter__(self) -> Waiting:
        if self.progress.enabled:
            self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.done = True
        self.timer.cancel()
        self.progress.close()

    def _show(self) -> None:
        with self.lock:  # never after the call has returned: the main thread may be writing again
            if not self.done:
                self.progress._write(self.progress.text(None, self.progress.clock()), first=True)
                self.progress.shown_at = self.progress.clock()
