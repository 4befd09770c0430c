"""Load and soak of one server (issue 10): the front's memory under many streams and requests.

    .venv/bin/python scripts/soak.py [--model DIR] [--streams 1000] [--requests 20000]

(a) `--streams` Generate streams held open at once (`max_new_tokens` 2000, `ignore_eos`:
    they run or wait in the queue while the others run), held `--hold-s` seconds, then all
    cancelled by their clients: the front's RSS before, at the peak, after.
(b) `--requests` short requests (max_new_tokens 1-2, `--concurrency` in flight) through one
    server started with `--retention-s` small: the front's RSS before, at the peak, after the
    last one, and after retention expiry (finished results swept).

RSS is VmRSS of the front process (/proc/<pid>/status); workers are other processes. Prints
one table per part; docs/reliability.md keeps the figures. Not a test: nothing is asserted
but that every call ended as it should (counts are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from service_harness import RunningServer, start_server, wait_for  # noqa: E402

from shoal.v1 import inference_pb2 as pb  # noqa: E402
from shoal.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class PeakRss:
    """Samples a process's RSS every 50 ms in a thread; `.peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def idle(server: RunningServer, timeout: float = 120) -> None:
    stub = server.stub()

    def nothing_running() -> bool:
        stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        return not (stats.pending_queue_length or stats.total.active_sequences)

    wait_for(nothing_running, timeout, "nothing running", interval=0.2)


async def warm_up(stub: pb_grpc.InferenceStub, n: int = 200) -> None:
    async def one(i: int) -> None:
        request = pb.GenerateRequest(prompt=f"warm {i}", max_new_tokens=2, ignore_eos=True)
        async for _ in stub.Generate(request, timeout=120):
            pass

    await asyncio.gather(*(one(i) for i in range(n)))


async def streams_part(server: RunningServer, n: int, hold_s: float) -> list[tuple]:
    pid = server.process.pid
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        await warm_up(stub)
        idle(server)
        before = rss_mb(pid)
        peak = PeakRss(pid)
        chunks = collections.Counter()
        calls = []
        started = time.perf_counter()
        for i in range(n):
            request = pb.GenerateRequest(
                prompt=f"stream {i}", max_new_tokens=2000, ignore_eos=True, seed=i
            )
            calls.append(stub.Generate(request, timeout=3600))

        async def read(call) -> str:
            try:
                async for _ in call:
                    chunks["chunks"] += 1
                return "finished"
            except asyncio.CancelledError:
                return "cancelled"
            except grpc.aio.AioRpcError as err:
                return err.code().name

        readers = [asyncio.ensure_future(read(c)) for c in calls]
        await asyncio.sleep(hold_s)
        stats = await stub.GetStats(pb.GetStatsRequest(), timeout=10)
        held = sum(not r.done() for r in readers)
        at_hold = rss_mb(pid)
        for call in calls:
            call.cancel()
        endings = collections.Counter(await asyncio.gather(*readers))
        await asyncio.to_thread(idle, server)
        await asyncio.sleep(1)
        after = rss_mb(pid)
        top = peak.stop()
        elapsed = time.perf_counter() - started
    return [
        ("streams opened", n),
        ("streams open at the end of the hold", held),
        ("running / queued at the end of the hold",
         f"{stats.total.active_sequences} / {stats.pending_queue_length}"),
        ("chunks received during the hold", chunks["chunks"]),
        ("how the streams ended", dict(endings)),
        ("front RSS before (MB)", f"{before:.1f}"),
        ("front RSS at the end of the hold (MB)", f"{at_hold:.1f}"),
        ("front RSS peak (MB)", f"{top:.1f}"),
        ("front RSS after all cancelled, idle (MB)", f"{after:.1f}"),
        ("wall time (s)", f"{elapsed:.0f}"),
    ]  # fmt: skip


async def requests_part(
    server: RunningServer, n: int, concurrency: int, retention_s: float
) -> list[tuple]:
    pid = server.process.pid
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        await warm_up(stub)
        idle(server)
        await asyncio.sleep(retention_s + 0.5)
        await warm_up(stub, 1)  # sweeps the warm-up's retained results
        before = rss_mb(pid)
        peak = PeakRss(pid)
        codes: collections.Counter[str] = collections.Counter()
        tokens = 0
        queue = iter(range(n))
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal tokens
            for i in queue:
                request = pb.GenerateRequest(
                    prompt=f"short request {i}", max_new_tokens=1 + i % 2, ignore_eos=True
                )
                try:
                    async for chunk in stub.Generate(request, timeout=120):
                        tokens += len(chunk.token_ids)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after_last = rss_mb(pid)
        await asyncio.to_thread(idle, server)
        await asyncio.sleep(retention_s + 0.5)
        await warm_up(stub, 1)  # expiry is swept when a request arrives or finishes
        await asyncio.sleep(0.5)
        after_expiry = rss_mb(pid)
        top = peak.stop()
    return [
        ("requests", n),
        ("in flight at once", concurrency),
        ("codes", dict(codes)),
        ("tokens received", tokens),
        ("wall time (s)", f"{elapsed:.0f} ({n / elapsed:.0f} req/s)"),
        ("front RSS before (MB)", f"{before:.1f}"),
        ("front RSS peak (MB)", f"{top:.1f}"),
        ("front RSS after the last (MB)", f"{after_last:.1f}"),
        (f"front RSS after retention expiry ({retention_s:g} s) (MB)", f"{after_expiry:.1f}"),
    ]


def table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="default: a random `default` checkpoint")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=30)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--retention-s", type=float, default=10)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--skip", choices=["streams", "requests"])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shoal-soak-"))
    model = args.model
    if model is None:
        from worker.random_checkpoint import write_checkpoint

        model = write_checkpoint(work / "default", "default")
    common = ("--workers", "1", "--max-batch-size", str(args.max_batch_size))
    if args.skip != "streams":
        server = start_server(
            model, work / "streams.log", *common, "--max-queue-len", str(args.streams + 100)
        )
        try:
            rows = asyncio.run(streams_part(server, args.streams, args.hold_s))
        finally:
            server.stop()
        table(f"(a) {args.streams} concurrent streams, held {args.hold_s:g} s", rows)
    if args.skip != "requests":
        flags = ("--retention-s", str(args.retention_s), "--max-queue-len", "4096")
        server = start_server(model, work / "requests.log", *common, *flags)
        try:
            rows = asyncio.run(
                requests_part(server, args.requests, args.concurrency, args.retention_s)
            )
        finally:
            server.stop()
        table(f"(b) {args.requests} short requests through one server", rows)
    print(f"\nlogs: {work}")


if __name__ == "__main__":
    main()
