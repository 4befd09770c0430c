"""Shared-memory rings and doorbells: the transport of the worker channel.

Per worker there are two single-producer / single-consumer byte rings in
`multiprocessing.shared_memory`, one per direction, and a doorbell pipe per
ring so an idle consumer sleeps in the kernel instead of spinning.

Ring layout (one segment):

    [0:8)     head: bytes consumed so far (written by the consumer only)
    [64:72)   tail: bytes published so far (written by the producer only)
    [128:)    data, `capacity` bytes, a multiple of 8

Head and tail grow for ever (uint64); a byte's place in the data is the
counter modulo `capacity`. They sit on separate cache lines so the two sides
do not false-share. A message is stored as a record: a u64 payload length,
then the payload, padded to 8 bytes. Records are 8-byte aligned, so a length
never straddles the end of the data; a payload may, and is then copied in two
pieces. The producer copies a whole record in, then publishes it with one
aligned 8-byte store to `tail`, so a message is visible entirely or not at
all; the consumer reads records up to `tail`, then publishes `head`.
(Aligned 8-byte stores are atomic and stay in program order for other cores
on x86-64, the platform this is built for; ARM64 would need fences.)

When the ring is full, `try_write` returns False and writes nothing: the
caller waits (back-pressure); nothing is dropped or overwritten.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import uuid
from collections.abc import Iterator
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

SEGMENT_PREFIX = "shoal-"
_HEAD, _TAIL = 0, 8  # indices into the header viewed as uint64 (byte offsets 0 and 64)
_HEADER_BYTES = 128
_LENGTH = struct.Struct("<Q")


def _align8(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    """One direction of the channel. Exactly one process writes, one reads."""

    def __init__(self, shm: shared_memory.SharedMemory, capacity: int) -> None:
        self.shm = shm
        self.capacity = capacity
        self._counters = shm.buf[:_HEADER_BYTES].cast("Q")  # 16 uint64 slots
        self._data = shm.buf[_HEADER_BYTES : _HEADER_BYTES + capacity]

    @classmethod
    def create(cls, name: str, capacity: int) -> Ring:
        """A new segment of `capacity` data bytes (ValueError unless a multiple of 8, >= 4096)."""
        if capacity < 4096 or capacity % 8:
            raise ValueError(f"ring capacity must be a multiple of 8, >= 4096 (got {capacity})")
        shm = shared_memory.SharedMemory(name=name, create=True, size=_HEADER_BYTES + capacity)
        shm.buf[:_HEADER_BYTES] = bytes(_HEADER_BYTES)
        return cls(shm, capacity)

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Open a segment the other side created; its creator alone unlinks it."""
        shm = shared_memory.SharedMemory(name=name, create=False)
        # Python < 3.13 registers even an attached segment with this process's resource
        # tracker, which would unlink it (and warn) when this process exits.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, shm.size - _HEADER_BYTES)

    @property
    def max_message_bytes(self) -> int:
        return self.capacity - _LENGTH.size

    # -- producer --------------------------------------------------------------------
    def try_write(self, message: bytes) -> bool:
        """Publish the whole message, or nothing (False) when the ring lacks room now.

        ValueError for a message larger than the ring could ever hold.
        """
        need = _align8(_LENGTH.size + len(message))
        if need > self.capacity:
            raise ValueError(
                f"message of {len(message)} bytes exceeds the ring "
                f"({self.max_message_bytes} bytes at most)"
            )
        tail = self._counters[_TAIL]
        if self.capacity - (tail - self._counters[_HEAD]) < need:
            return False
        pos = tail % self.capacity
        _LENGTH.pack_into(self._data, pos, len(message))
        start = (pos + _LENGTH.size) % self.capacity
        first = min(len(message), self.capacity - start)
        self._data[start : start + first] = message[:first]
        self._data[: len(message) - first] = message[first:]
        self._counters[_TAIL] = tail + need  # publish
        return True

    # -- consumer --------------------------------------------------------------------
    def read_messages(self) -> Iterator[bytes]:
        """Every message published so far, in order."""
        head, tail = self._counters[_HEAD], self._counters[_TAIL]
        while head < tail:
            pos = head % self.capacity
            (length,) = _LENGTH.unpack_from(self._data, pos)
            start = (pos + _LENGTH.size) % self.capacity
            first = min(length, self.capacity - start)
            message = bytes(self._data[start : start + first])
            if first < length:
                message += bytes(self._data[: length - first])
            head += _align8(_LENGTH.size + length)
            self._counters[_HEAD] = head  # frees the space as we go
            yield message

    def close(self) -> None:
        self._counters.release()
        self._data.release()
        self.shm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


class Doorbell:
    """A pipe used as a wake-up signal: ring after publishing, wait when idle.

    Built from raw file descriptors so a spawned process can inherit one end
    (`pass_fds`). Ringing writes one byte and never blocks (a full pipe
    already means "wake up"); waiting drains every pending byte. An end this
    process does not use is -1.
    """

    def __init__(self, read_fd: int = -1, write_fd: int = -1) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.set_blocking(fd, False)

    @classmethod
    def create(cls) -> Doorbell:
        read_fd, write_fd = os.pipe()
        return cls(read_fd, write_fd)

    def ring(self) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.write_fd, b"\x01")

    def wait(self, timeout: float | None) -> bool:
        """Block until rung (or `timeout` seconds); True if it was rung."""
        readable, _, _ = select.select([self.read_fd], [], [], timeout)
        if not readable:
            return False
        self.drain()
        return True

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 4096):
                pass

    def fileno(self) -> int:
        return self.read_fd

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.read_fd = self.write_fd = -1


def segment_name(worker: int, direction: str) -> str:
    """`shoal-<front pid>-<random>-w<i>-<in|out>`: unique, and names its creator for sweeping."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-w{worker}-{direction}"


def sweep_stale_segments(shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unlink `shoal-` segments whose creating process is gone (a crashed run)."""
    removed = []
    for path in shm_dir.glob(f"{SEGMENT_PREFIX}*"):
        pid_text = path.name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
