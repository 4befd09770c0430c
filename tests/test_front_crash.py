"""The front SIGKILLed: its workers notice and exit, busy or not; the next start sweeps /dev/shm.

A worker checks `os.getppid()` (re-parented once its front is gone) when idle, between
engine steps, and while it waits on a full outbox that nobody drains any more.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from service_harness import ServerGroup, start_server, wait_for
from test_resume import worker_pids

from shoal.v1 import inference_pb2 as pb
from worker.channel.messages import Rejected
from worker.channel.ring import Doorbell, Ring, segment_name
from worker.process import FRONT_CHECK_S, FrontGone, WorkerLoop

pytestmark = pytest.mark.timeout(120)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (whoever adopted it may not reap it at once)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if int(ppid) == pid:
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sigkill_of_the_front_leaves_no_worker_and_no_segment(
    servers: ServerGroup, tmp_path: Path
) -> None:
    server = start_server(servers.model, tmp_path / "killed.log", "--workers", "2")
    try:
        stub = server.stub()
        request = pb.GenerateRequest(
            request_id="long", prompt="busy", max_new_tokens=2000, ignore_eos=True
        )
        stub.Submit(request, timeout=10)
        stream = stub.Stream(pb.StreamRequest(request_id="long"), timeout=30)
        next(stream)  # running: one worker is busy, the other idle
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2
        dead = server.process.pid
        assert server.segments()
        # Its multiprocessing resource tracker would unlink the rings when the front dies;
        # killed with it (an OOM kill, say), it cannot: the next start must sweep them.
        tracker = [p for p in children(dead) if b"resource_tracker" in cmdline(p)]
        for pid in tracker:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        server.process.kill()  # the workers are left to notice by themselves
        server.process.wait(timeout=10)
        wait_for(lambda: not any(alive(p) for p in workers), 3, "both workers exited")
        took = time.monotonic() - killed
    finally:
        if server.process.poll() is None:
            server.process.kill()
    left = [p.name for p in Path("/dev/shm").glob(f"shoal-{dead}-*")]
    assert left, "nothing for the next start to sweep"
    servers.start("--workers", "1")  # sweeps the dead front's segments at start
    assert list(Path("/dev/shm").glob(f"shoal-{dead}-*")) == []
    print(f"workers gone {took:.2f} s after SIGKILL; {len(left)} segments left, swept at start")


def test_a_worker_blocked_on_a_full_outbox_notices_the_front_is_gone() -> None:
    outbox, bell = Ring.create(segment_name(0, "out"), 4096), Doorbell.create()
    try:
        # Only what `send` uses; the parent is not ours, as if the front had died.
        loop = WorkerLoop.__new__(WorkerLoop)
        loop.outbox, loop.outbox_bell = outbox, bell
        loop.parent, loop._checked_at = os.getppid() + 1, time.monotonic()
        started = time.monotonic()
        with pytest.raises(FrontGone):  # nobody reads the outbox: it fills, then this
            loop.send([Rejected(i, "x" * 100) for i in range(1000)])
        assert time.monotonic() - started < 2 * FRONT_CHECK_S + 0.5
    finally:
        outbox.close()
        outbox.unlink()
        bell.close()
