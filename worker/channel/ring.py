"""Shared-memory rings and doorbells: the transport of the worker channel.

Per worker there are two single-producer / single-consumer byte rings in
`multiprocessing.shared_memory`, one per direction, and a doorbell pipe per
ring so an idle consumer sleeps in the kernel instead of spinning.

Ring layout (one segment):

    [0:8)     head: bytes consumed so far (written by the consumer only)
    [64:72)   tail: bytes published so far (written by the producer only)
    [128:)    data, `capacity` bytes, a power of two

Head and tail grow for ever (uint64) and are taken modulo capacity; they sit
on separate cache lines so the two sides do not false-share. A frame is a
little-endian u32 length, a u32 flag word, then the payload, padded to 8
bytes. A frame never wraps: when it does not fit before the end, the
producer writes a PAD word and starts again at offset 0. The producer copies
the frame in, then publishes it with one aligned 8-byte store to `tail`; the
consumer reads frames up to `tail`, then publishes its progress to `head`.
(Aligned 8-byte stores are atomic and stay in program order for other cores
on x86-64, the platform this is built for; ARM64 would need fences.)

Messages larger than one frame (long prompts) are split into frames whose
MORE flag is set on all but the last; the consumer joins them. When the ring
is full the producer waits (back-pressure): nothing is dropped or overwritten.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import struct
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path

SEGMENT_PREFIX = "shoal-"
_HEAD, _TAIL = 0, 8  # indices into the header viewed as uint64 (byte offsets 0 and 64)
_HEADER_BYTES = 128
_FRAME = struct.Struct("<II")  # payload length, flags
_PAD = 0xFFFFFFFF  # a length that means "skip to the start of the ring"
_MORE = 1  # flag: the message continues in the next frame


def _align8(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    """One direction of the channel. Exactly one process writes, one reads."""

    def __init__(self, shm: shared_memory.SharedMemory, capacity: int) -> None:
        self.shm = shm
        self.capacity = capacity
        self._counters = shm.buf[:_HEADER_BYTES].cast("Q")  # 16 uint64 slots
        self._data = shm.buf[_HEADER_BYTES : _HEADER_BYTES + capacity]
        # Largest payload per frame: leaves room for the frame header and padding.
        self.max_frame_payload = capacity // 4
        self._partial: list[bytes] = []  # consumer side: frames of an unfinished message

    @classmethod
    def create(cls, name: str, capacity: int) -> Ring:
        if capacity < 4096 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity must be a power of two >= 4096 (got {capacity})")
        shm = shared_memory.SharedMemory(name=name, create=True, size=_HEADER_BYTES + capacity)
        shm.buf[:_HEADER_BYTES] = bytes(_HEADER_BYTES)
        return cls(shm, capacity)

    @classmethod
    def attach(cls, name: str) -> Ring:
        shm = shared_memory.SharedMemory(name=name, create=False)
        return cls(shm, shm.size - _HEADER_BYTES)

    # -- producer --------------------------------------------------------------------
    def free_bytes(self) -> int:
        return self.capacity - (self._counters[_TAIL] - self._counters[_HEAD])

    def frames_of(self, message: bytes) -> list[tuple[bytes, int]]:
        step = self.max_frame_payload
        pieces = [message[i : i + step] for i in range(0, len(message), step)] or [b""]
        return [(p, _MORE if i < len(pieces) - 1 else 0) for i, p in enumerate(pieces)]

    def try_write_frame(self, payload: bytes, flags: int = 0) -> bool:
        """Copy one frame in and publish it; False (nothing written) when it does not fit."""
        need = _align8(_FRAME.size + len(payload))
        tail = self._counters[_TAIL]
        pos = tail % self.capacity
        skip = self.capacity - pos if pos + need > self.capacity else 0
        if self.free_bytes() < skip + need:
            return False
        if skip:
            _FRAME.pack_into(self._data, pos, _PAD, 0)
            pos = 0
        _FRAME.pack_into(self._data, pos, len(payload), flags)
        self._data[pos + _FRAME.size : pos + _FRAME.size + len(payload)] = payload
        self._counters[_TAIL] = tail + skip + need  # publish
        return True

    # -- consumer --------------------------------------------------------------------
    def read_messages(self) -> Iterator[bytes]:
        """Every complete message published so far, in order."""
        head, tail = self._counters[_HEAD], self._counters[_TAIL]
        while head < tail:
            pos = head % self.capacity
            length, flags = _FRAME.unpack_from(self._data, pos)
            if length == _PAD:
                head += self.capacity - pos
                continue
            start = pos + _FRAME.size
            self._partial.append(bytes(self._data[start : start + length]))
            head += _align8(_FRAME.size + length)
            self._counters[_HEAD] = head  # frees the space as we go
            if not flags & _MORE:
                message = b"".join(self._partial)
                self._partial.clear()
                yield message
        self._counters[_HEAD] = head

    def close(self) -> None:
        self._counters.release()
        self._data.release()
        self.shm.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


class Doorbell:
    """A pipe used as a wake-up signal: ring after publishing, wait when idle.

    Both ends are multiprocessing Connections, so they pass to a spawned
    process as arguments. Ringing writes one byte and never blocks (a full
    pipe already means "wake up"); waiting drains every pending byte.
    """

    def __init__(self, reader: Connection, writer: Connection) -> None:
        self.reader, self.writer = reader, writer
        # Non-blocking at the open-file level, which spawned processes share: a ring
        # never blocks on a full pipe and a drain stops when the pipe is empty.
        os.set_blocking(reader.fileno(), False)
        os.set_blocking(writer.fileno(), False)

    @classmethod
    def create(cls) -> Doorbell:
        reader, writer = multiprocessing.Pipe(duplex=False)
        return cls(reader, writer)

    def ring(self) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.writer.fileno(), b"\x01")

    def wait(self, timeout: float | None) -> bool:
        """Block until rung (or timeout); True if it was rung."""
        if not self.reader.poll(timeout):
            return False
        self.drain()
        return True

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.reader.fileno(), 4096):
                pass

    def fileno(self) -> int:
        return self.reader.fileno()


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
