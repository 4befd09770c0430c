"""The PNG of `python -m client bench --plot`: latency distributions and tokens/s over time.

Needs matplotlib (`pip install -e '.[bench]'`); imported only when a plot is asked for.
"""

from __future__ import annotations

import math
from pathlib import Path

from client.bench import RequestRecord


def plot(records: list[RequestRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.error is None]
    series = {
        "TTFT (ms)": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "TPOT (ms)": [r.tpot_ms for r in ok if r.tpot_ms is not None],
        "E2E (ms)": [r.e2e_ms for r in ok if r.e2e_ms is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=False):
        ax.hist(values, bins=30, color="tab:blue", alpha=0.8)
        ax.set_title(name)
        ax.set_ylabel("requests")

    # Tokens per second over the run, in one-second buckets of chunk arrival times.
    end = max((t for r in ok for t in r.chunk_times_s), default=0.0)
    buckets = [0] * (math.floor(end) + 1)
    for r in ok:
        for t in r.chunk_times_s:
            buckets[math.floor(t)] += 1
    ax = axes.flat[3]
    ax.plot(range(len(buckets)), buckets, color="tab:green")
    ax.set_title("output tokens/s over time")
    ax.set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
