"""Prometheus metrics for the front, in a private registry served on `--metrics-port`.

Everything is recorded on the event loop where it happens: an RPC ends, a
request is dispatched, a token arrives, a request finishes, a worker sends its
Status (once per engine step, not per token). Per token the work is one
histogram observation. The queue lengths and the restart count are read at
scrape time by a collector, so the hot path keeps nothing up to date for them.

A private CollectorRegistry (not prometheus_client's global one) lets several
servers live in one process, as tests do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.requests import RequestState
from worker.channel.messages import Status
from worker.channel.types import Priority

# Seconds. 0.2 is a bucket edge on purpose: the latency alert's threshold is exact there.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
WORKER_LABEL = ("worker",)
# Finish labels, all exported from start so a rate over any of them exists at 0.
FINISH_LABELS = ("length", "stop", "eos", "cancelled", "error")


def finish_label(state: RequestState) -> str:
    """length, stop, eos, cancelled (client cancel or deadline), or error (ended by the server)."""
    return "error" if state.error is not None else state.finish_reason.name.lower()


@dataclass
class _WorkerSeries:
    """One worker's labelled children, looked up once instead of per Status."""

    up: Gauge
    active: Gauge
    utilization: Gauge
    waiting: Gauge
    kv_used: Gauge
    kv_total: Gauge
    kv_cached: Gauge
    prefix_hit_rate: Gauge
    tokens: Counter
    preemptions: Counter
    draft_tokens: Counter
    accepted_draft_tokens: Counter
    prefix_queries: Counter
    prefix_hits: Counter
    # The worker's own counters restart from 0 with a new process: only deltas are added.
    last_tokens: int = 0
    last_preemptions: int = 0
    last_draft_tokens: int = 0
    last_accepted_draft_tokens: int = 0
    last_prefix_queries: int = 0
    last_prefix_hits: int = 0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shoal_requests", "Inference RPCs by method and status", ("rpc", "code"), registry=r
        )
        self.http_requests = Counter(
            "shoal_http_requests",
            "HTTP requests (OpenAI API, health, page) by route and status",
            ("route", "code"),
            registry=r,
        )
        self.finished = Counter(
            "shoal_requests_finished",
            "Requests finished, by reason (length, stop, eos, cancelled, error)",
            ("reason",),
            registry=r,
        )
        for reason in FINISH_LABELS:
            self.finished.labels(reason)
        self.resumed = Counter(
            "shoal_requests_resumed",
            "Requests put back in the queue, with their tokens, after their worker died",
            registry=r,
        )
        self.queue_time = Histogram(
            "shoal_queue_time_seconds",
            "Arrival to dispatch to a worker",
            ("priority",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "shoal_ttft_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inter_token = Histogram(
            "shoal_inter_token_latency_seconds",
            "Time between consecutive tokens of a request, as the front receives them",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "shoal_request_latency_seconds",
            "Arrival to finish (end to end, every finish reason)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._gauges = {
            "up": Gauge("shoal_worker_up", "1 while the worker serves", WORKER_LABEL, registry=r),
            "active": Gauge(
                "shoal_active_sequences", "Sequences running in a worker", WORKER_LABEL, registry=r
            ),
            "utilization": Gauge(
                "shoal_batch_utilization",
                "Running sequences / max batch size",
                WORKER_LABEL,
                registry=r,
            ),
            "waiting": Gauge(
                "shoal_worker_waiting_sequences",
                "Requests in the worker waiting for KV space or preempted",
                WORKER_LABEL,
                registry=r,
            ),
            "kv_used": Gauge(
                "shoal_kv_blocks_used", "KV cache blocks in use", WORKER_LABEL, registry=r
            ),
            "kv_total": Gauge(
                "shoal_kv_blocks_total", "KV cache blocks in the pool", WORKER_LABEL, registry=r
            ),
            "kv_cached": Gauge(
                "shoal_kv_blocks_cached",
                "KV blocks held by no sequence, kept for prefix cache hits (evictable)",
                WORKER_LABEL,
                registry=r,
            ),
            "prefix_hit_rate": Gauge(
                "shoal_prefix_cache_hit_rate",
                "Prefix cache hit tokens / looked-up tokens since the worker started",
                WORKER_LABEL,
                registry=r,
            ),
        }
        self._counters = {
            "tokens": Counter(
                "shoal_generated_tokens", "Tokens generated by the worker", WORKER_LABEL, registry=r
            ),
            "preemptions": Counter(
                "shoal_preemptions", "Sequences preempted for KV space", WORKER_LABEL, registry=r
            ),
            # Acceptance rate: rate(accepted) / rate(draft tokens).
            "draft_tokens": Counter(
                "shoal_speculative_draft_tokens",
                "Speculative decoding: draft tokens verified by the model",
                WORKER_LABEL,
                registry=r,
            ),
            "accepted_draft_tokens": Counter(
                "shoal_speculative_accepted_tokens",
                "Speculative decoding: draft tokens accepted",
                WORKER_LABEL,
                registry=r,
            ),
            "prefix_queries": Counter(
                "shoal_prefix_cache_query_tokens",
                "Tokens looked up in the prefix cache when sequences start",
                WORKER_LABEL,
                registry=r,
            ),
            "prefix_hits": Counter(
                "shoal_prefix_cache_hit_tokens",
                "Looked-up tokens found in the prefix cache (not computed again)",
                WORKER_LABEL,
                registry=r,
            ),
        }
        self._workers: dict[int, _WorkerSeries] = {}
        self._http: WSGIServer | None = None

    def observe_on_scrape(
        self, queue_lengths: Callable[[], Mapping[Priority, int]], restarts: Callable[[], int]
    ) -> None:
        """Read these at scrape time (from the HTTP thread: both are plain reads)."""
        self.registry.register(_ScrapeCollector(queue_lengths, restarts))

    # -- requests ----------------------------------------------------------------------
    def rpc_done(self, rpc: str, code: str) -> None:
        self.requests.labels(rpc, code).inc()

    def http_done(self, route: str, status: int) -> None:
        self.http_requests.labels(route, str(status)).inc()

    def dispatched(self, state: RequestState) -> None:
        priority = state.request.priority.name.lower()
        self.queue_time.labels(priority).observe(state.queue_s or 0.0)

    def token(self, state: RequestState, previous: float | None) -> None:
        """After a token was added; `previous` is when the one before it came (None: first)."""
        assert state.last_token_at is not None
        if previous is None:
            self.ttft.observe(state.ttft_s or 0.0)
        else:
            self.inter_token.observe(state.last_token_at - previous)

    def resumed_request(self) -> None:
        self.resumed.inc()

    def request_finished(self, state: RequestState) -> None:
        self.finished.labels(finish_label(state)).inc()
        self.latency.observe(state.total_s or 0.0)

    # -- workers -----------------------------------------------------------------------
    def _series(self, index: int) -> _WorkerSeries:
        series = self._workers.get(index)
        if series is None:
            label = str(index)
            children = {k: g.labels(label) for k, g in {**self._gauges, **self._counters}.items()}
            series = self._workers[index] = _WorkerSeries(**children)
        return series

    def worker_ready(self, index: int, kv_blocks_total: int) -> None:
        series = self._series(index)
        series.up.set(1)
        series.kv_total.set(kv_blocks_total)

    def worker_status(self, index: int, status: Status) -> None:
        s = self._series(index)
        s.active.set(status.running)
        s.utilization.set(status.utilization)
        s.waiting.set(status.waiting)
        s.kv_used.set(status.kv_blocks_used)
        s.kv_total.set(status.kv_blocks_total)
        s.kv_cached.set(status.kv_blocks_cached)
        queries, hits = status.prefix_cache_query_tokens, status.prefix_cache_hit_tokens
        s.prefix_hit_rate.set(status.prefix_cache_hit_rate)
        # A smaller total than last time means a new process: its whole total is new.
        s.tokens.inc(_delta(status.total_tokens, s.last_tokens))
        s.preemptions.inc(_delta(status.preemptions, s.last_preemptions))
        s.prefix_queries.inc(_delta(queries, s.last_prefix_queries))
        s.prefix_hits.inc(_delta(hits, s.last_prefix_hits))
        s.last_tokens, s.last_preemptions = status.total_tokens, status.preemptions
        s.draft_tokens.inc(_delta(status.draft_tokens, s.last_draft_tokens))
        s.accepted_draft_tokens.inc(
            _delta(status.accepted_draft_tokens, s.last_accepted_draft_tokens)
        )
        s.last_draft_tokens = status.draft_tokens
        s.last_accepted_draft_tokens = status.accepted_draft_tokens
        s.last_prefix_queries, s.last_prefix_hits = queries, hits

    def worker_gone(self, index: int) -> None:
        s = self._series(index)
        for gauge in (s.up, s.active, s.utilization, s.waiting, s.kv_used, s.kv_cached):
            gauge.set(0)
        # its replacement counts from 0 (and starts with an empty prefix cache)
        s.last_tokens = s.last_preemptions = s.last_prefix_queries = s.last_prefix_hits = 0
        s.last_draft_tokens = s.last_accepted_draft_tokens = 0

    # -- endpoint ----------------------------------------------------------------------
    def serve(self, host: str, port: int) -> None:
        """Start the HTTP endpoint (a daemon thread of prometheus_client)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server

    def close(self) -> None:
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _delta(total: int, last: int) -> int:
    return total - last if total >= last else total


class _ScrapeCollector(Collector):
    def __init__(
        self, queue_lengths: Callable[[], Mapping[Priority, int]], restarts: Callable[[], int]
    ) -> None:
        self.queue_lengths = queue_lengths
        self.restarts = restarts

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "shoal_queue_length", "Requests in the pending queue, by priority", labels=["priority"]
        )
        for priority, length in self.queue_lengths().items():
            queue.add_metric([priority.name.lower()], length)
        yield queue
        yield CounterMetricFamily(
            "shoal_worker_restarts", "Workers restarted after dying", value=self.restarts()
        )
