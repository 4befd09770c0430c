"""Serving load generator: `python -m client bench`.

Requests arrive as a Poisson process at `--rate` per second (`inf`: all at
once), optionally capped at `--concurrency` in flight; prompt and output
lengths are drawn from distributions; every request's timeline is recorded:

    TTFT  arrival of the first token after the request was sent
    TPOT  (end - first token) / (output tokens - 1): time per output token after the first
    ITL   every gap between two consecutive chunks (one token per chunk while decoding)
    E2E   send to last token

Prompts are random token ids below the model's vocab size and `ignore_eos`
is set, so each request has exactly the lengths drawn.

The plan is the same whichever API drives it (`--api`): a `BenchDriver` sends
one request and reports its chunks. `GrpcDriver` here (the Inference service);
`client.bench_openai.OpenAIDriver` (the OpenAI-compatible HTTP API, through the
`openai` package, imported only when asked for).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any, Protocol

from client.aio import AsyncShoalClient
from client.errors import ShoalError
from client.progress import Progress


@dataclass(frozen=True)
class LengthDist:
    """`128` (fixed) or `16:512` (uniform, inclusive)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = text.split(":")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            low, high = 0, -1
        if not 1 <= low <= high:
            raise ValueError(
                f"length distribution must be N or LOW:HIGH with 1 <= LOW <= HIGH: {text!r}"
            )
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class BenchPlan:
    requests: int
    rate: float  # requests per second; math.inf = all at once
    prompt_len: LengthDist
    output_len: LengthDist
    seed: int = 0
    concurrency: int | None = None


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int
    max_new_tokens: int
    scheduled_s: float  # planned arrival, from the start of the run
    sent_s: float = 0.0
    first_token_s: float | None = None
    end_s: float | None = None
    output_tokens: int = 0
    chunk_times_s: list[float] = field(default_factory=list)
    error: str | None = None  # gRPC status code name, or HTTP_<status> etc. (OpenAI API)

    def arrived(self, now: float, tokens: int) -> None:
        """A chunk carrying `tokens` output tokens arrived at `now` (seconds from the start)."""
        if self.first_token_s is None:
            self.first_token_s = now
        self.chunk_times_s.append(now)
        self.output_tokens += tokens

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.sent_s) * 1000

    @property
    def e2e_ms(self) -> float | None:
        return None if self.end_s is None else (self.end_s - self.sent_s) * 1000

    @property
    def tpot_ms(self) -> float | None:
        if self.end_s is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) * 1000 / (self.output_tokens - 1)

    def itl_ms(self) -> list[float]:
        times = self.chunk_times_s
        return [(b - a) * 1000 for a, b in pairwise(times)]

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "e2e_ms": self.e2e_ms,
        }


def arrival_schedule(plan: BenchPlan, rng: random.Random) -> list[float]:
    """Seconds from the start at which each request is sent (Poisson process)."""
    if math.isinf(plan.rate):
        return [0.0] * plan.requests
    times, now = [], 0.0
    for _ in range(plan.requests):
        times.append(now)
        now += rng.expovariate(plan.rate)
    return times


def make_records(plan: BenchPlan, vocab_size: int) -> tuple[list[RequestRecord], list[list[int]]]:
    rng = random.Random(plan.seed)
    arrivals = arrival_schedule(plan, rng)
    records, prompts = [], []
    for i, at in enumerate(arrivals):
        n_prompt, n_out = plan.prompt_len.draw(rng), plan.output_len.draw(rng)
        prompts.append([rng.randrange(1, vocab_size) for _ in range(n_prompt)])
        records.append(RequestRecord(i, n_prompt, n_out, at))
    return records, prompts


class BenchDriver(Protocol):
    """One API's way to send the plan's requests (see GrpcDriver, bench_openai.OpenAIDriver)."""

    label: str  # what the summary names, e.g. "grpc 127.0.0.1:50051"

    async def vocab_size(self) -> int:
        """Random prompt ids are drawn below this."""
        ...

    async def warm_up(self, prompt: list[int]) -> None: ...

    async def send(
        self, record: RequestRecord, prompt: list[int], clock: Callable[[], float]
    ) -> None:
        """Stream one request, calling `record.arrived(clock(), n)` per chunk of n tokens."""
        ...

    def error_name(self, err: Exception) -> str | None:
        """The name recorded for a failed request; None: not a request failure, re-raise."""
        ...


class GrpcDriver:
    """The Inference service: `Generate` with prompt_token_ids and ignore_eos."""

    def __init__(self, client: AsyncShoalClient, vocab_size: int | None = None) -> None:
        self.client = client
        self.label = f"grpc {client.target}"
        self._vocab_size = vocab_size

    async def vocab_size(self) -> int:
        if self._vocab_size is None:
            self._vocab_size = (await self.client.model_info()).vocab_size
        return self._vocab_size

    async def warm_up(self, prompt: list[int]) -> None:
        await self.client.generate_text(prompt_token_ids=prompt, max_new_tokens=4, ignore_eos=True)

    async def send(
        self, record: RequestRecord, prompt: list[int], clock: Callable[[], float]
    ) -> None:
        stream = self.client.generate(
            prompt_token_ids=prompt, max_new_tokens=record.max_new_tokens, ignore_eos=True
        )
        async for chunk in stream:
            if chunk.token_ids:
                record.arrived(clock(), len(chunk.token_ids))

    def error_name(self, err: Exception) -> str | None:
        return err.code.name if isinstance(err, ShoalError) else None


async def _one(
    driver: BenchDriver,
    record: RequestRecord,
    prompt: list[int],
    start: float,
    limit: asyncio.Semaphore | None,
    progress: Progress | None,
) -> None:
    await asyncio.sleep(max(0.0, start + record.scheduled_s - time.perf_counter()))
    if limit is not None:
        await limit.acquire()
    record.sent_s = time.perf_counter() - start
    try:
        await driver.send(record, prompt, lambda: time.perf_counter() - start)
        record.end_s = time.perf_counter() - start
    except Exception as err:
        name = driver.error_name(err)
        if name is None:
            raise
        record.error = name
    finally:
        if limit is not None:
            limit.release()
        if progress is not None:
            progress.update(done=1, tokens=record.output_tokens, failed=record.error is not None)


async def run_bench(
    client: AsyncShoalClient | BenchDriver, plan: BenchPlan, progress: Progress | None = None
) -> tuple[list[RequestRecord], float]:
    """Warm up with one request, then run the plan; returns records and wall seconds.

    `client`: an AsyncShoalClient (gRPC) or any BenchDriver; the same plan and seed give
    the same prompts and lengths through either, when the vocab sizes agree.
    """
    driver = GrpcDriver(client) if isinstance(client, AsyncShoalClient) else client
    records, prompts = make_records(plan, await driver.vocab_size())
    await driver.warm_up(prompts[0])
    limit = asyncio.Semaphore(plan.concurrency) if plan.concurrency else None
    start = time.perf_counter()
    await asyncio.gather(
        *(_one(driver, r, p, start, limit, progress) for r, p in zip(records, prompts, strict=True))
    )
    return records, time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    ordered = sorted(values)

    def at(q: float) -> float:  # nearest-rank percentile
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"mean": sum(ordered) / len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "ttft_ms": percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "tpot_ms": percentiles([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl_ms()]),
        "e2e_ms": percentiles([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        "errors": dict(Counter(r.error for r in records if r.error)),
    }


def summary_table(summary: dict[str, Any]) -> str:
    lines = [
        f"requests: {summary['completed']}/{summary['requests']} completed in "
        f"{summary['wall_s']:.2f} s",
        f"request throughput: {summary['request_throughput']:.2f} req/s",
        f"output tokens/s: {summary['output_tokens_per_s']:.1f} "
        f"({summary['output_tokens']} tokens)",
        "",
        "| metric (ms) | mean | p50 | p90 | p99 |",
        "|---|---|---|---|---|",
    ]
    for key, name in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2e_ms", "E2E"),
    ):
        row = summary[key]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row[q]:.1f}" for q in ("mean", "p50", "p90", "p99"))
            + " |"
        )
    errors = summary["errors"]
    lines += [
        "",
        "errors: " + (", ".join(f"{code} x{n}" for code, n in sorted(errors.items())) or "none"),
    ]
    return "\n".join(lines)
