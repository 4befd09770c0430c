"""Handing freed memory back to the OS after big, short-lived buffers (glibc's malloc_trim).

glibc keeps what a thread frees in that thread's arena (a heap of up to 64 MiB per
arena, one arena for each thread that allocates at the same time as another: gRPC's
own threads, the tokenizer thread) and returns it to the OS only from the top of a
heap. A big request fills an arena with buffers that are all free a moment later, and
the front's RSS then stays at that high-water mark: gRPC request messages of 30 MiB
(refused: over the 4 MiB limit) left 0.4-0.6 MB each, +85 to +115 MB after 200 of them,
free memory that `malloc_trim(0)` gives back (scripts/rss_probe.py, docs/reliability.md).
`malloc_trim(0)` releases the free pages of every arena (glibc >= 2.8); it costs about
what it releases (~0.25 ms per MiB) and little when there is nothing to release. It runs
on the event loop's thread: run from a thread of its own, while gRPC's threads went on
receiving, it gave back far less (+41 MB instead of +9 MB after 300 messages of 10 MiB).
The figures vary by tens of MB from run to run (which arena a buffer lands in); what the
trims change is that the growth does not add up.

Elsewhere (musl, macOS) there is no malloc_trim and these calls do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

TRIM_AFTER_BYTES = 1 << 20  # a request at least this big is followed by a trim
TRIM_AGAIN_S = 0.5  # and by a second one, for what gRPC's threads free after the call
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only


def trim() -> None:
    """Give every arena's free pages back to the OS, now, in the calling thread."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def trim_soon() -> None:
    """`trim` on the event loop's next turn, after the call now running (e.g. a request
    deserializer) has let go of its buffers, and again TRIM_AGAIN_S later, for what gRPC's
    threads free after that (with the first alone, the front still kept up to ~0.4 MB per
    30 MiB message in some runs). Without a running event loop, once, at once."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        trim()
        return
    loop.call_soon(trim)
    loop.call_later(TRIM_AGAIN_S, trim)
