"""The front's RSS over many refused gRPC requests of one kind (docs/reliability.md).

    .venv/bin/python scripts/rss_probe.py [--kind messages] [--warmup 100] [--requests 600]

Starts `python -m server` (one worker, the random `default` checkpoint unless --model),
sends --warmup requests, reads the front's RSS, sends --requests more, reads it again,
and prints both and the growth per request. Every request is refused (INVALID_ARGUMENT),
so nothing is queued or retained: what stays is what the refusal left behind.

Kinds:
  messages     1,500 chat messages (over max_messages 1024): ~18 KB on the wire
  token-ids    5,000 prompt_token_ids with max_new_tokens 0: ~5 KB
  big-message  a 30 MiB prompt (over the 4 MiB message limit)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from service_harness import start_server  # noqa: E402

from shoal.v1 import inference_pb2 as pb  # noqa: E402

FLAGS = ("--workers", "1", "--kv-cache-mb", "16", "--max-new-tokens-limit", "4")
SETTLE_S = 2.0  # before each reading: past the front's second trim (server/memory.py)


def request(kind: str, i: int) -> bytes:
    if kind == "messages":
        chat = [pb.ChatMessage(role="user", content=f"c{i}")] * 1500
        message = pb.GenerateRequest(messages=chat, max_new_tokens=2)
    elif kind == "token-ids":
        message = pb.GenerateRequest(prompt_token_ids=[7] * 5000, max_new_tokens=0)
    else:
        message = pb.GenerateRequest(prompt="a" * (30 << 20) + str(i), max_new_tokens=2)
    return message.SerializeToString()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("messages", "token-ids", "big-message"))
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--model", type=Path, help="default: a random `default` checkpoint")
    args = parser.parse_args()
    kind = args.kind or "messages"
    work = Path(tempfile.mkdtemp(prefix="shoal-rss-"))
    model = args.model
    if model is None:
        from worker.random_checkpoint import write_checkpoint

        model = write_checkpoint(work / "default", "default")
    server = start_server(model, work / "server.log", *FLAGS)
    pid = server.process.pid
    try:
        with grpc.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            submit = channel.unary_unary("/shoal.v1.Inference/Submit")

            def send(n: int) -> None:
                for i in range(n):
                    try:
                        submit(request(kind, i), timeout=60)
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                            raise
                    else:
                        raise RuntimeError("a request meant to be refused was accepted")

            send(args.warmup)
            time.sleep(SETTLE_S)
            before = rss_kb(pid)
            started = time.perf_counter()
            send(args.requests)
            elapsed = time.perf_counter() - started
            time.sleep(SETTLE_S)
            after = rss_kb(pid)
    finally:
        server.stop()
    print(f"| kind | {kind} |\n|---|---|")
    print(f"| requests after a warm-up of {args.warmup} | {args.requests} ({elapsed:.0f} s) |")
    print(f"| front RSS after the warm-up (MB) | {before / 1024:.1f} |")
    print(f"| front RSS after the requests (MB) | {after / 1024:.1f} |")
    print(f"| growth per request (KB) | {(after - before) / args.requests:.1f} |")


if __name__ == "__main__":
    main()
