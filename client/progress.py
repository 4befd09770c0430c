"""A small stderr progress line for the batch command: done/total, failures, tokens/s."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redrawn in place on a terminal; into a log (not a tty) a line every few seconds, so
    CI logs stay short."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = self.failed = self.tokens = 0
        self.started = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = 0.1 if self._tty else 5.0
        self._drawn_at = -1e9

    def update(self, done: int = 0, tokens: int = 0, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._drawn_at >= self._interval:
            self._draw(now)

    def note(self, message: str) -> None:
        """A message line that doesn't leave a half-drawn bar behind it."""
        self.stream.write(("\r\x1b[K" if self._tty else "") + message + "\n")
        self._drawn_at = -1e9  # redraw the bar below the message at the next update

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        filled = self.width * self.done // self.total if self.total else self.width
        bar = "=" * filled + " " * (self.width - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"|{bar}| {self.done}/{self.total} requests{failed}, "
            f"{self.tokens / elapsed:,.1f} tok/s, {elapsed:.1f} s"
        )

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        self.stream.write(("\r\x1b[K" + self.line(now)) if self._tty else self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.perf_counter())
        if self._tty:
            self.stream.write("\n")
        self.stream.flush()
