"""What a prediction returns: the outputs, the unit that answered, and every attempt and skip with its reason."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One step of the chain for one request.

    ``outcome`` is ``answered``, ``failed`` (the chain moved on), ``retried`` (the same unit is tried
    again) or ``skipped`` (the unit was not called: unavailable, failed earlier, capability, memory).
    ``delay_s`` is the measured wait before this step (retry backoff or thermal wait) and
    ``planned_delay_s`` what the strategy asked for.
    """

    unit: str
    outcome: str
    reason: str
    error_type: str | None = None
    action: str | None = None
    seconds: float = 0.0
    delay_s: float = 0.0
    planned_delay_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """The answer and how it was reached."""

    outputs: dict[str, np.ndarray]
    unit: str
    attempts: tuple[Attempt, ...]
    chain: tuple[str, ...]
    power_target: str
    power_reason: str
    latency_s: float
    unit_latency_s: float
    fallback_overhead_s: float | None
    notes: tuple[str, ...] = ()
    batch_size: int | None = None

    @property
    def skipped(self) -> dict[str, str]:
        """Unit name -> why it was skipped or given up on this request."""
        return {a.unit: a.reason for a in self.attempts if a.outcome in ("skipped", "failed")}

    @property
    def retries(self) -> int:
        return sum(1 for a in self.attempts if a.outcome == "retried")

    def to_dict(self, *, include_outputs: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "unit": self.unit,
            "chain": list(self.chain),
            "attempts": [a.to_dict() for a in self.attempts],
            "skipped": self.skipped,
            "power_target": self.power_target,
            "power_reason": self.power_reason,
            "latency_s": self.latency_s,
            "unit_latency_s": self.unit_latency_s,
            "fallback_overhead_s": self.fallback_overhead_s,
            "notes": list(self.notes),
            "batch_size": self.batch_size,
            "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.outputs.items()},
        }
        if include_outputs:
            d["output_values"] = {k: v.tolist() for k, v in self.outputs.items()}
        return d
