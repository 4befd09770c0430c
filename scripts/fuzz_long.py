"""The gRPC fuzz of tests/test_grpc_fuzz.py with 10,000 examples (not in the suite).

    .venv/bin/python scripts/fuzz_long.py [--model DIR] [--examples 10000]

Same strategies, same server flags, same checks (a disallowed status code stops the run
with hypothesis's minimal example); the examples are split over the four generators like
the suite's (GenerateRequest 23 %, StreamRequest 23 %, CancelRequest 14 %, raw mutated
bytes 40 %). Prints a table of the inputs tried and the codes returned, and the front's RSS
and shared-memory segments before and after. docs/reliability.md keeps the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import test_grpc_fuzz as fuzz  # noqa: E402
from service_harness import start_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="default: a random `default` checkpoint")
    parser.add_argument("--examples", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shoal-fuzz-"))
    model = args.model
    if model is None:
        from worker.random_checkpoint import write_checkpoint

        model = write_checkpoint(work / "default", "default")
    server = start_server(model, work / "grpc_fuzz.log", *fuzz.SERVER_FLAGS)
    started = time.perf_counter()
    try:
        with grpc.insecure_channel(server.target) as channel:
            caller = fuzz.Caller(channel)
            base = fuzz.baseline.__wrapped__(server, caller)
            n = args.examples
            shares = {"typed": 0.23, "stream": 0.23, "cancel": 0.14, "raw": 0.40}

            def run(strategy, send, share: float) -> None:
                @settings(fuzz.SETTINGS, max_examples=max(1, int(n * share)))
                @given(value=strategy)
                def one(value) -> None:
                    send(value)

                one()

            run(
                st.tuples(
                    fuzz.generate_requests(), st.sampled_from(["Submit", "Submit", "Generate"])
                ),
                lambda v: caller.send(v[1], v[0].SerializeToString()),
                shares["typed"],
            )
            run(
                fuzz.stream_requests(),
                lambda r: caller.send("Stream", r.SerializeToString()),
                shares["stream"],
            )
            run(
                fuzz.cancel_requests(),
                lambda r: caller.send("Cancel", r.SerializeToString()),
                shares["cancel"],
            )
            run(
                fuzz.raw_requests(),
                lambda v: caller.send(v[0], v[1], fuzz.kind_of(*v)),
                shares["raw"],
            )
            stats = fuzz.settle(server, caller)
            rss_after = fuzz.rss_kb(server.process.pid)
            segments_after = set(server.segments())
    finally:
        code = server.stop()
    elapsed = time.perf_counter() - started
    log = server.log.read_text()
    print(f"\n{sum(fuzz.TALLY.values())} calls in {elapsed:.0f} s (server exit status {code})\n")
    print("| rpc | input | code | calls |\n|---|---|---|---|")
    for (rpc, kind, status), count in sorted(fuzz.TALLY.items()):
        print(f"| {rpc} | {kind} | {status} | {count} |")
    print("\n| after the fuzz | value |\n|---|---|")
    print(f"| running / queued | {stats.total.active_sequences} / {stats.pending_queue_length} |")
    print(f"| front RSS after warm-up (MB) | {base['rss_kb'] / 1024:.1f} |")
    print(f"| front RSS after the fuzz (MB) | {rss_after / 1024:.1f} |")
    print(f"| segments before / after | {len(base['segments'])} / {len(segments_after)} |")
    tracebacks = log.count("Traceback")
    decode_errors = log.count("DecodeError: Error parsing message")
    print(
        f"| tracebacks in the log (DecodeError: the known bug) | {tracebacks} ({decode_errors}) |"
    )
    print(f"\nlog: {server.log}")


if __name__ == "__main__":
    main()
