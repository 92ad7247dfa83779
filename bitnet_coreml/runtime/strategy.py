"""Fallback configuration: unit names, power targets and the frozen, self-validating :class:`FallbackStrategy`."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Sequence

from bitnet_coreml.errors import ConfigError, InputError
from bitnet_coreml.vocab import COREML_UNITS, parse_unit


class ComputeUnit(str, enum.Enum):
    """The units a prediction can run on; Core ML units carry their ``ct.ComputeUnit`` name."""

    ANE = "ane"
    GPU = "gpu"
    CPU = "cpu"
    REFERENCE = "reference"

    @property
    def coreml_name(self) -> str | None:
        """The ``coremltools.ComputeUnit`` member for a Core ML unit, ``None`` for the reference executor."""
        return _COREML_NAMES.get(self)

    @classmethod
    def parse(cls, name: str) -> ComputeUnit:
        """``"ane"`` (or ``"ANE"``, ``"CPU_AND_NE"``) -> ``ComputeUnit.ANE``; unknown names raise
        :class:`ConfigError` listing the valid ones (spellings: :mod:`bitnet_coreml.vocab`)."""
        try:
            return cls(parse_unit(getattr(name, "value", name)))
        except InputError as e:
            raise ConfigError(str(e)) from None


_COREML_NAMES = {ComputeUnit(k): v for k, v in COREML_UNITS.items()}

UNIT_NAMES: tuple[str, ...] = tuple(u.value for u in ComputeUnit)
DEFAULT_CHAIN: tuple[ComputeUnit, ...] = (ComputeUnit.ANE, ComputeUnit.GPU, ComputeUnit.CPU, ComputeUnit.REFERENCE)


class PowerTarget(str, enum.Enum):
    """The seed's power management: how to order the unit chain."""

    SPEED = "speed"
    EFFICIENCY = "efficiency"
    BALANCED = "balanced"

    @classmethod
    def parse(cls, name: str) -> PowerTarget:
        try:
            return cls(name.strip().lower())
        except ValueError:
            raise ConfigError(
                f"unknown power target {name!r}; allowed: {', '.join(p.value for p in cls)}"
            ) from None


# Lower key = tried earlier. The ANE draws the least power per inference and the GPU the most, so
# `efficiency` defers the GPU behind the CPU. For `speed`, small (compute-bound) models are fastest on
# the ANE, while models whose weights must stream from DRAM on every prediction are bound by memory
# bandwidth, where the GPU is stronger.
_EFFICIENCY_KEY = {ComputeUnit.ANE: 0, ComputeUnit.CPU: 1, ComputeUnit.GPU: 2, ComputeUnit.REFERENCE: 3}
_SPEED_COMPUTE_KEY = {ComputeUnit.ANE: 0, ComputeUnit.GPU: 1, ComputeUnit.CPU: 2, ComputeUnit.REFERENCE: 3}
_SPEED_BANDWIDTH_KEY = {ComputeUnit.GPU: 0, ComputeUnit.ANE: 1, ComputeUnit.CPU: 2, ComputeUnit.REFERENCE: 3}


def order_for_power(
    kinds: Sequence[ComputeUnit], target: PowerTarget, *, bandwidth_bound: bool
) -> tuple[list[int], str]:
    """Indices of ``kinds`` in the order ``target`` prefers, and a one-line reason.

    ``balanced`` keeps the configured order. The sort is stable, so units of the same kind keep their
    relative order.
    """
    idx = list(range(len(kinds)))
    if target is PowerTarget.BALANCED:
        return idx, "balanced: configured unit order"
    if target is PowerTarget.EFFICIENCY:
        idx.sort(key=lambda i: _EFFICIENCY_KEY[kinds[i]])
        return idx, "efficiency: ANE first (least power per inference), GPU last"
    key = _SPEED_BANDWIDTH_KEY if bandwidth_bound else _SPEED_COMPUTE_KEY
    idx.sort(key=lambda i: key[kinds[i]])
    if bandwidth_bound:
        return idx, "speed: GPU first (weights exceed the bandwidth-bound threshold; GPU has more memory bandwidth)"
    return idx, "speed: ANE first (model is small enough to be compute-bound)"


@dataclasses.dataclass(frozen=True)
class FallbackStrategy:
    """How the predictor tries units, retries and validates (the seed's ``FallbackStrategy``).

    Durations are seconds. ``max_retry_attempts`` bounds the retries *per unit per request*; a unit
    that still fails after them is given up and the chain moves on. The retry before attempt ``i+1``
    waits ``min(retry_delay_s * backoff_factor**i, max_retry_delay_s)``.
    """

    units: tuple[ComputeUnit, ...] = DEFAULT_CHAIN
    enable_cpu_fallback: bool = True
    enable_gpu_fallback: bool = True
    enable_reference_fallback: bool = True
    max_retry_attempts: int = 3
    retry_delay_s: float = 0.05
    backoff_factor: float = 2.0
    max_retry_delay_s: float = 2.0
    monitor_fallback_performance: bool = True
    unit_timeout_s: float | None = 300.0
    probe_coreml_units: bool = True
    probe_timeout_s: float = 180.0
    validate_first_use: bool = True
    validation_max_rel_l2: float = 0.05
    thermal_wait_s: float = 10.0
    power_target: PowerTarget = PowerTarget.BALANCED
    bandwidth_bound_weight_bytes: int = 64 * 1024 * 1024
    monitor_interval_s: float = 1.0
    recent_error_window_s: float = 60.0
    latency_window: int = 1024

    def __post_init__(self) -> None:
        units = tuple(ComputeUnit.parse(u) if isinstance(u, str) else u for u in self.units)
        object.__setattr__(self, "units", units)
        if isinstance(self.power_target, str) and not isinstance(self.power_target, PowerTarget):
            object.__setattr__(self, "power_target", PowerTarget.parse(self.power_target))
        if not units:
            raise ConfigError("FallbackStrategy.units is empty; give at least one of " + ", ".join(UNIT_NAMES))
        dupes = sorted({u.value for u in units if units.count(u) > 1})
        if dupes:
            raise ConfigError(f"FallbackStrategy.units lists {', '.join(dupes)} more than once; each unit at most once")
        if not isinstance(self.max_retry_attempts, int) or isinstance(self.max_retry_attempts, bool) \
                or not 0 <= self.max_retry_attempts <= 100:
            raise ConfigError(f"FallbackStrategy.max_retry_attempts={self.max_retry_attempts!r}; allowed: integer 0..100")
        self._non_negative("retry_delay_s", self.retry_delay_s)
        self._non_negative("max_retry_delay_s", self.max_retry_delay_s)
        self._non_negative("thermal_wait_s", self.thermal_wait_s)
        self._non_negative("monitor_interval_s", self.monitor_interval_s)
        if not (isinstance(self.backoff_factor, (int, float)) and math.isfinite(self.backoff_factor)
                and self.backoff_factor >= 1.0):
            raise ConfigError(f"FallbackStrategy.backoff_factor={self.backoff_factor!r}; allowed: a finite number >= 1")
        if self.unit_timeout_s is not None:
            self._positive("unit_timeout_s", self.unit_timeout_s)
        self._positive("probe_timeout_s", self.probe_timeout_s)
        self._positive("recent_error_window_s", self.recent_error_window_s)
        if not 0 < self.validation_max_rel_l2 < 1:
            raise ConfigError(
                f"FallbackStrategy.validation_max_rel_l2={self.validation_max_rel_l2!r}; allowed: 0 < value < 1"
            )
        if self.latency_window < 1:
            raise ConfigError(f"FallbackStrategy.latency_window={self.latency_window!r}; allowed: >= 1")
        if self.bandwidth_bound_weight_bytes < 0:
            raise ConfigError("FallbackStrategy.bandwidth_bound_weight_bytes must be >= 0")

    @staticmethod
    def _non_negative(name: str, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"FallbackStrategy.{name}={value!r}; allowed: a finite number >= 0")

    @staticmethod
    def _positive(name: str, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"FallbackStrategy.{name}={value!r}; allowed: a finite number > 0")

    def enabled_units(self) -> tuple[ComputeUnit, ...]:
        """``units`` minus the fallbacks this strategy disables (the first unit is always kept)."""
        off: set[ComputeUnit] = set()
        if not self.enable_cpu_fallback:
            off.add(ComputeUnit.CPU)
        if not self.enable_gpu_fallback:
            off.add(ComputeUnit.GPU)
        if not self.enable_reference_fallback:
            off.add(ComputeUnit.REFERENCE)
        return tuple(u for i, u in enumerate(self.units) if i == 0 or u not in off)

    def retry_delays(self) -> list[float]:
        """The delays before each allowed retry, in order."""
        from bitnet_coreml.runtime.recovery import backoff_delay

        return [backoff_delay(i, base_s=self.retry_delay_s, factor=self.backoff_factor, cap_s=self.max_retry_delay_s)
                for i in range(self.max_retry_attempts)]

    def with_units(self, units: Iterable[str | ComputeUnit]) -> FallbackStrategy:
        """A copy with another unit chain (validated)."""
        return dataclasses.replace(self, units=tuple(units))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["units"] = [u.value for u in self.units]
        d["power_target"] = self.power_target.value
        return d
