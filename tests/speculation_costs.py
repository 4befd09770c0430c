"""Fixed cost models for speculative decoding tests: what gets drafted must not hang on
how fast this machine happens to be (worker/spec_policy.py StepCosts is measured)."""

from __future__ import annotations

from worker.spec_policy import StepCosts


class FlatCosts(StepCosts):
    """Every step costs the same whatever its rows: a device where drafting is free."""

    def estimate(self, decodes: int, rows: int) -> float:
        return 1.0


class DearRows(StepCosts):
    """Each row costs as much as a whole step: drafting never pays."""

    def estimate(self, decodes: int, rows: int) -> float:
        return float(rows)
