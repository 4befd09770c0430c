"""When speculation pays: acceptance estimates, the measured cost of a step, the choice.

Drafting k tokens for a sequence makes the target's forward pass k rows
larger; it pays when the tokens those rows are expected to add outweigh
what the rows cost. Both sides are measured while the engine runs:

- `AcceptanceRate`: per sequence, alpha = the chance a draft token is
  accepted given the one before it was (accepted drafts over drafts examined:
  the accepted ones plus the first rejected, older evidence decaying). The
  j-th draft token then adds alpha^j expected tokens.
- `StepCosts`: wall seconds of a decode-only step by (decodes, query rows),
  an exponential average per point, read between points by linear
  interpolation. On a CPU a second row can cost as much as the first (one
  matrix-vector product becomes a matrix product); on a GPU rows are nearly
  free until the matmuls fill the device. No constant here assumes either.
- `choose_draft_lengths`: takes draft tokens in order of their chance while
  the expected tokens per second of the step grow.

`AcceptancePolicy` is the rule for draft-model sequences, whose choice must
not depend on timing (a sampled request's tokens depend on its drafts):
draft while alpha^j >= MIN_CHANCE, and back off exponentially while it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field


@dataclass
class AcceptanceRate:
    """alpha, estimated from verified (or would-be) drafts with decaying weight."""

    DECAY = 0.8

    hits: float = 1.0  # prior: alpha = 1/2, worth two draft tokens
    trials: float = 2.0

    @property
    def alpha(self) -> float:
        return self.hits / self.trials

    def update(self, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` draft tokens matched (a prefix, as verification accepts)."""
        self.hits = self.DECAY * self.hits + accepted
        self.trials = self.DECAY * self.trials + accepted + (accepted < drafted)

    def chances(self, limit: int) -> list[float]:
        """Expected tokens added by the 1st .. limit-th draft token: alpha^j."""
        return [self.alpha**j for j in range(1, limit + 1)]


@dataclass
class AcceptancePolicy(AcceptanceRate):
    """Draft length from alpha alone (see the module docstring), with backoff.

    The j-th draft token is drafted while alpha^j >= MIN_CHANCE. Below that
    for even one token, the sequence stops drafting for `cooldown` steps,
    doubling (up to MAX_COOLDOWN) while the probes after it fail.
    """

    MIN_CHANCE = 0.4
    MAX_COOLDOWN = 64

    cooldown: int = 0
    backoff: int = 0

    def draft_length(self, limit: int) -> int:
        """Draft tokens for this step (0 = plain decode); `limit` >= 0 caps it."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return 0
        k, chance = 1, self.alpha  # at least one: a probe after a cooldown
        while k < limit and chance * self.alpha >= self.MIN_CHANCE:
            k, chance = k + 1, chance * self.alpha
        return min(k, limit)

    def update(self, drafted: int, accepted: int) -> None:
        super().update(drafted, accepted)
        if self.alpha < self.MIN_CHANCE:
            self.backoff = min(max(2 * self.backoff, 1), self.MAX_COOLDOWN)
            self.cooldown = self.backoff
        else:
            self.backoff = 0


@dataclass
class StepCosts:
    """Seconds of a decode-only engine step, by (decodes, query rows), learned online.

    A point not measured in the last MAX_AGE steps at its number of decodes is
    forgotten, so one measured in a noisy moment cannot keep speculation off
    for good: the next choice tries that size again (at most once per MAX_AGE
    steps) and measures it afresh.
    """

    WEIGHT = 0.25  # of the newest measurement in the running average
    MAX_AGE = 256

    # decodes -> rows -> (running average, step count at the last measurement)
    seconds: dict[int, dict[int, tuple[float, int]]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # decodes -> steps measured

    def observe(self, decodes: int, rows: int, seconds: float) -> None:
        now = self.steps[decodes] = self.steps.get(decodes, 0) + 1
        table = self.seconds.setdefault(decodes, {})
        old = table.get(rows)
        average = seconds if old is None else old[0] + self.WEIGHT * (seconds - old[0])
        table[rows] = (average, now)

    def estimate(self, decodes: int, rows: int) -> float | None:
        """Interpolated between measured row counts; beyond the largest, as cheap as it
        (optimistic: a larger step gets tried, then measured). None before any at `decodes`."""
        now = self.steps.get(decodes, 0)
        table = {
            r: average
            for r, (average, seen) in self.seconds.get(decodes, {}).items()
            if now - seen < self.MAX_AGE
        }
        if not table:
            return None
        if rows in table:
            return table[rows]
        below = max((r for r in table if r < rows), default=None)
        above = min((r for r in table if r > rows), default=None)
        if above is None or below is None:
            return table[below if above is None else above]
        share = (rows - below) / (above - below)
        return table[below] + share * (table[above] - table[below])


def choose_draft_lengths(
    offers: Mapping[Hashable, list[float]],
    decodes: int,
    cost: Callable[[int], float | None],
    margin: float = 0.02,
) -> dict[Hashable, int]:
    """How many of its offered draft tokens each sequence verifies this step.

    offers[s] = the expected tokens of s's 1st, 2nd, ... draft token (non-
    increasing); `decodes` sequences decode (one token each without drafts);
    cost(rows) = estimated seconds of a step of that many query rows. Draft
    tokens are taken best first while expected tokens per second grow; the
    result must beat plain decoding by `margin`. Nothing is drafted until the
    plain step's cost is known: it is measured first.
    """
    plain = cost(decodes)
    if plain is None or not offers:
        return {}
    marginals = sorted(
        ((chance, s) for s, chances in offers.items() for chance in chances),
        key=lambda item: -item[0],
    )  # stable: each sequence's own tokens stay in order
    best_n, best_rate, tokens = 0, decodes / plain * (1 + margin), float(decodes)
    for n, (chance, _) in enumerate(marginals, start=1):
        tokens += chance
        seconds = cost(decodes + n)
        if seconds is not None and tokens / seconds > best_rate:
            best_n, best_rate = n, tokens / seconds
    lengths: dict[Hashable, int] = {}
    for _, s in marginals[:best_n]:
        lengths[s] = lengths.get(s, 0) + 1
    return lengths
