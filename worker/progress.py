"""A one-line progress bar on stderr: done/total and tokens/s."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._interactive = stream.isatty()

    def update(self, done: int = 0, tokens: int = 0) -> None:
        self.done += done
        self.tokens += tokens
        now = time.perf_counter()
        # Redraw at most 10 times a second on a terminal, once every 5 s into a log file.
        if now - self._last_draw >= (0.1 if self._interactive else 5.0):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.tokens / max(now - self.started, 1e-9)
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} requests, {rate:,.1f} tok/s"
        self.stream.write(("\r" + line) if self._interactive else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.perf_counter())
        if self._interactive:
            self.stream.write("\n")
        self.stream.flush()
