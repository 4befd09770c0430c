"""The commands of `python -m client`, each a function of (client, args) -> exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any, TextIO

import grpc

from client.aio import AsyncShoalClient
from client.batch import count_failed, parse_lines, run_batch, write_records
from client.bench import BenchDriver, BenchPlan, GrpcDriver, run_bench, summarize, summary_table
from client.cli import (
    client_kwargs,
    parse_args,
    request_params,
    sampling_params,
    system_turn,
)
from client.errors import ShoalError
from client.health import cmd_health
from client.progress import Progress
from client.sync import ShoalClient
from client.types import Chunk, Completion, CompletionBuilder, Stats, WorkerStats


def summary_line(done: Completion) -> str:
    """finish reason, token counts and latencies, as greppable key=value pairs."""
    tokens = done.usage.completion_tokens if done.usage else len(done.token_ids)
    parts = [f"finish={done.finish_reason or 'NONE'}", f"tokens={tokens}"]
    if done.usage:
        parts.append(f"prompt_tokens={done.usage.prompt_tokens}")
        parts.append(f"cached_prompt_tokens={done.usage.cached_prompt_tokens}")
    if done.timing:
        t = done.timing
        parts += [f"ttft_ms={t.ttft_ms:.1f}", f"total_ms={t.total_ms:.1f}"]
        parts.append(f"queue_ms={t.queue_ms:.1f}")
    parts.append(f"request_id={done.request_id}")
    return " ".join(parts)


def logprob_lines(done: Completion, first: int = 0) -> list[str]:
    """One line per token (`first`: the index of the first): its index, id and
    log-probability, then the alternatives as id:logprob."""
    lines = []
    for i, lp in enumerate(done.logprobs, start=first):
        line = f"logprob {i} token={lp.token_id} {lp.logprob:.4f}"
        if lp.top:
            line += " top " + " ".join(f"{t.token_id}:{t.logprob:.4f}" for t in lp.top)
        lines.append(line)
    return lines


def print_chunks(chunks: Iterable[Chunk], out: TextIO) -> Completion:
    """Write each chunk's text as it arrives (flushed), then return the whole completion."""
    builder = CompletionBuilder()
    for chunk in chunks:
        builder.add(chunk)
        out.write(chunk.text)
        out.flush()
    out.write("\n")
    return builder.build()


def cmd_generate(client: ShoalClient, args: argparse.Namespace) -> int:
    params = request_params(args)
    if args.stream:
        done = print_chunks(client.generate(**params), sys.stdout)
    else:
        done = client.generate_text(**params)
        print(done.text)
    for line in logprob_lines(done):
        print(line, file=sys.stderr)
    print(summary_line(done), file=sys.stderr)
    return 0


def cmd_chat(client: ShoalClient, args: argparse.Namespace) -> int:
    """Read user turns (a prompt on a terminal, lines from a pipe), stream each answer."""
    history = system_turn(args)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = system_turn(args)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        done = print_chunks(client.generate(messages=history, **sampling_params(args)), sys.stdout)
        history.append({"role": "assistant", "content": done.text})
        print(summary_line(done), file=sys.stderr)


def cmd_submit(client: ShoalClient, args: argparse.Namespace) -> int:
    print(client.submit(**request_params(args)))
    return 0


def cmd_stream(client: ShoalClient, args: argparse.Namespace) -> int:
    done = print_chunks(client.stream(args.request_id, args.from_index), sys.stdout)
    for line in logprob_lines(done, args.from_index):
        print(line, file=sys.stderr)
    print(summary_line(done), file=sys.stderr)
    return 0


def cmd_cancel(client: ShoalClient, args: argparse.Namespace) -> int:
    if client.cancel(args.request_id):
        print(f"cancelled {args.request_id}")
    else:
        print(f"{args.request_id} had already finished")
    return 0


def stats_table(stats: Stats) -> str:
    header = f"{'worker':>6} {'alive':>5} {'active':>6} {'queue':>5} {'util':>6} "
    header += f"{'tokens':>12} {'kv blocks':>13} {'drafts accepted':>15} "
    header += f"{'cached':>7} {'prefix hit':>10}"

    def row(name: str, w: WorkerStats) -> str:
        kv = f"{w.kv_blocks_used}/{w.kv_blocks_total}"
        drafts = f"{w.draft_acceptance_rate:.1%}" if w.draft_tokens else "-"
        return (
            f"{name:>6} {'yes' if w.alive else 'no':>5} {w.active_sequences:>6} "
            f"{w.queue_length:>5} {w.utilization:>6.1%} {w.total_tokens:>12,} {kv:>13} "
            f"{drafts:>15} {w.kv_blocks_cached:>7} {w.prefix_cache_hit_rate:>10.1%}"
        )

    rows = [row(str(w.worker), w) for w in stats.workers]
    pending = f"pending queue (not yet on a worker): {stats.pending_queue_length}"
    return "\n".join([header, *rows, row("total", stats.total), pending])


def cmd_stats(client: ShoalClient, args: argparse.Namespace) -> int:
    stats = client.stats()
    print(json.dumps(stats.as_dict(), indent=2) if args.json else stats_table(stats))
    return 0


def cmd_info(client: ShoalClient, args: argparse.Namespace) -> int:
    info = client.model_info().as_dict()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
            print(f"{key + ':':<{width + 1}} {shown}")
    return 0


async def cmd_batch(args: argparse.Namespace) -> int:
    items = parse_lines(args.input.read_text(encoding="utf-8").splitlines())
    jobs = sum(not isinstance(i, dict) for i in items)
    progress = Progress(total=jobs)
    for item in items:
        if isinstance(item, dict):
            progress.note(item["error"])
    started = time.perf_counter()
    async with AsyncShoalClient(args.target, **client_kwargs(args)) as client:
        records = await run_batch(client, items, args.concurrency, progress)
    progress.close()
    write_records(args.output, records)
    failed = count_failed(records)
    elapsed = time.perf_counter() - started
    print(f"{len(records)} lines in {elapsed:.1f} s, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


async def cmd_bench(args: argparse.Namespace) -> int:
    plan = BenchPlan(
        requests=args.requests,
        rate=args.rate,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        seed=args.seed,
        concurrency=args.concurrency,
    )
    if args.api == "openai":
        try:
            from client.bench_openai import OpenAIDriver

            driver: Any = OpenAIDriver(
                args.http_target,
                api_key=args.auth_token,
                timeout=args.timeout,
                endpoint=args.endpoint,
                model=args.model,
                vocab_size=args.vocab_size,
            )
        except RuntimeError as err:  # no openai package
            print(f"error: {err}", file=sys.stderr)
            return 1
        async with driver:
            return await _bench(driver, plan, args)
    async with AsyncShoalClient(args.target, **client_kwargs(args)) as client:
        return await _bench(GrpcDriver(client, args.vocab_size), plan, args)


async def _bench(driver: BenchDriver, plan: BenchPlan, args: argparse.Namespace) -> int:
    progress = Progress(total=plan.requests)
    try:
        records, wall_s = await run_bench(driver, plan, progress)
    except Exception as err:  # before the plan started: model, vocab size, warm-up
        name = driver.error_name(err)
        if name is None and not isinstance(err, RuntimeError):
            raise
        progress.close()
        print(f"error: {name + ': ' if name else ''}{err}", file=sys.stderr)
        return 1
    progress.close()
    summary = summarize(records, wall_s)
    print(f"api: {driver.label}")
    print(summary_table(summary))
    if args.json:
        report = {
            "api": args.api,
            "target": driver.label,
            "plan": asdict(plan),
            "summary": summary,
            "records": [r.as_dict() for r in records],
        }
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.plot:
        from client.bench_plot import plot

        plot(records, args.plot)
    return 1 if summary["errors"] else 0


COMMANDS: dict[str, Callable[[ShoalClient, argparse.Namespace], int]] = {
    "generate": cmd_generate,
    "submit": cmd_submit,
    "chat": cmd_chat,
    "stream": cmd_stream,
    "cancel": cmd_cancel,
    "stats": cmd_stats,
    "info": cmd_info,
    "health": cmd_health,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "batch":
            return asyncio.run(cmd_batch(args))
        if args.command == "bench":
            return asyncio.run(cmd_bench(args))
        with ShoalClient(args.target, **client_kwargs(args)) as client:
            return COMMANDS[args.command](client, args)
    except grpc.RpcError as rpc_err:
        err = ShoalError.from_rpc(rpc_err)
        print(f"error: {err.code.name}: {err.details}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:  # a bad target, an unreadable input file
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the stream's generator cancels its call on the way out
        return 130
