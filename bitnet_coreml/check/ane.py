"""The seed's capability API in Python: ANE data types, ANE capabilities, operation requirements.

``ANECapabilities`` answers the seed's three questions for one chip (or one ANE generation):
``meets_requirements``, ``get_requirement_mismatch`` and ``compatibility_score``. The numbers come
from the capability database (each with its source); a quantity the database does not know (e.g.
the TOPS of a chip the seed does not name) is *unknown*, never guessed: a requirement on it cannot
be confirmed, so it is reported as a mismatch, and it is left out of the score (see
:meth:`ANECapabilities.compatibility_score`).

``validate_operation_requirements`` checks the seed's ``CapabilityRequirements`` against a device of
the seed's capability matrix and the platform, raising :class:`CapabilityMismatchError` that lists
every mismatch at once. No onnx or coremltools import here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bitnet_coreml.check.capabilities import CapabilityDatabase, Chip, Device, default_database
from bitnet_coreml.errors import CapabilityMismatchError, InputError

TOPS = 1e12


class ANEDataType(str, enum.Enum):
    """Data types of the seed's ANE table (plus FLOAT32, which no ANE generation computes in)."""

    FLOAT16 = "fp16"
    INT8 = "int8"
    INT16 = "int16"
    UINT8 = "uint8"
    FLOAT32 = "fp32"

    # The seed's Rust spelling, for readers porting code from it.
    Float16 = "fp16"
    Int8 = "int8"
    Int16 = "int16"
    UInt8 = "uint8"
    Float32 = "fp32"

    @classmethod
    def parse(cls, value: str | ANEDataType) -> ANEDataType:
        """``"FP16"``, ``"float16"``, ``"Float16"``, ``"int8"`` ... -> member; InputError listing the allowed names."""
        if isinstance(value, ANEDataType):
            return value
        v = value.strip().lower().replace("float", "fp")
        for m in cls:
            if m.value == v:
                return m
        raise InputError(f"unknown data type {value!r}; allowed: {', '.join(m.value for m in cls)}")


@dataclass(frozen=True)
class ANECapabilities:
    """What one chip's (or generation's) Neural Engine offers, with the sources of each number.

    ``tops`` is ``None`` when unknown; ``model_size_budget_mb`` is the seed's per-generation budget
    (MiB; soft, not Apple-documented); ``int8_compute`` is ``None`` when unknown.
    """

    generation: int
    data_types: frozenset[ANEDataType]
    tops: float | None
    model_size_budget_mb: float | None
    int8_compute: bool | None = None
    chip: str | None = None
    sources: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def for_chip(cls, chip: str | Chip, db: CapabilityDatabase | None = None) -> ANECapabilities:
        """Capabilities of ``chip`` (a name like ``"A17Pro"`` or a database row); InputError if it has no ANE row."""
        db = db or default_database()
        c = chip if isinstance(chip, Chip) else db.chip(chip)
        if c.ane_generation is None:
            raise InputError(f"chip {c.name!r} has no ANE generation in the capability database ({c.source})")
        g = db.generation(c.ane_generation)
        return cls(generation=g.id, data_types=frozenset(ANEDataType.parse(t) for t in g.data_types),
                   tops=c.tops, model_size_budget_mb=g.model_size_budget_mb, int8_compute=c.int8_compute,
                   chip=c.name, sources=(c.source, g.source))

    @classmethod
    def for_generation(cls, gen_id: int, db: CapabilityDatabase | None = None) -> ANECapabilities:
        """Capabilities of ANE generation ``gen_id`` as the seed lists it (TOPS of the generation's row)."""
        db = db or default_database()
        g = db.generation(gen_id)
        return cls(generation=g.id, data_types=frozenset(ANEDataType.parse(t) for t in g.data_types),
                   tops=g.tops, model_size_budget_mb=g.model_size_budget_mb, sources=(g.source,))

    @property
    def label(self) -> str:
        return f"{self.chip} (ANE Gen {self.generation})" if self.chip else f"ANE Gen {self.generation}"

    def get_requirement_mismatch(self, ops_per_second: float, data_types: Iterable[ANEDataType | str],
                                 model_size_mb: float) -> list[str]:
        """Every requirement this ANE does not (or cannot be shown to) meet, one readable line each."""
        out: list[str] = []
        if ops_per_second > 0:
            if self.tops is None:
                out.append(f"ops_per_second: requires {ops_per_second:.3g} ops/s; the TOPS of {self.label} are unknown "
                           "(not in the capability sources), so this cannot be confirmed")
            elif self.tops * TOPS < ops_per_second:
                out.append(f"ops_per_second: requires {ops_per_second:.3g} ops/s; {self.label} provides "
                           f"{self.tops * TOPS:.3g} ({self.tops} TOPS)")
        for t in _parse_types(data_types):
            if t not in self.data_types:
                have = ", ".join(sorted(d.value for d in self.data_types))
                out.append(f"data type {t.value}: not supported by {self.label} (supports {have})")
        if model_size_mb > 0 and self.model_size_budget_mb is not None and model_size_mb > self.model_size_budget_mb:
            out.append(f"model size: {model_size_mb:.1f} MB exceeds the {self.label} budget of "
                       f"{self.model_size_budget_mb:g} MB (soft budget)")
        return out

    def meets_requirements(self, ops_per_second: float, data_types: Iterable[ANEDataType | str],
                           model_size_mb: float) -> bool:
        """True when every requirement is met and none depends on an unknown value."""
        return not self.get_requirement_mismatch(ops_per_second, data_types, model_size_mb)

    def score_components(self, ops_per_second: float, data_types: Iterable[ANEDataType | str],
                         model_size_mb: float) -> dict[str, float | None]:
        """The three factors of :meth:`compatibility_score` (``None`` = unknown, left out of the product)."""
        types = _parse_types(data_types)
        if ops_per_second <= 0:
            s_ops: float | None = 1.0
        elif self.tops is None:
            s_ops = None
        else:
            s_ops = min(1.0, self.tops * TOPS / ops_per_second)
        s_types = 1.0 if not types else sum(t in self.data_types for t in types) / len(types)
        if model_size_mb <= 0:
            s_size: float | None = 1.0
        elif self.model_size_budget_mb is None:
            s_size = None
        else:
            s_size = min(1.0, self.model_size_budget_mb / model_size_mb)
        return {"ops": s_ops, "data_types": s_types, "size": s_size}

    def compatibility_score(self, ops_per_second: float, data_types: Iterable[ANEDataType | str],
                            model_size_mb: float) -> float:
        """A score in [0, 1]: how well this ANE fits the requirements.

        ``score = s_ops * s_types * s_size`` where

        * ``s_ops   = min(1, TOPS * 1e12 / ops_per_second)`` (1 when no ops are required),
        * ``s_types = (required data types this ANE supports) / (required data types)`` (1 when none),
        * ``s_size  = min(1, budget_mb / model_size_mb)`` with the seed's per-generation budget (1 when size <= 0).

        A factor whose input is unknown (TOPS of an unnamed chip, a generation without a budget) is
        left out of the product rather than guessed; :meth:`meets_requirements` is False in that case.
        The score is 1.0 exactly when every known requirement is met.
        """
        score = 1.0
        for v in self.score_components(ops_per_second, data_types, model_size_mb).values():
            if v is not None:
                score *= v
        return score


def _parse_types(data_types: Iterable[ANEDataType | str]) -> list[ANEDataType]:
    seen: list[ANEDataType] = []
    for t in data_types:
        p = ANEDataType.parse(t)
        if p not in seen:
            seen.append(p)
    return seen


@dataclass(frozen=True)
class CapabilityRequirements:
    """The seed's operation requirements (``minimum_memory_mb`` in MiB)."""

    neural_network_support: bool = True
    matrix_multiplication: bool = True
    convolution_support: bool = False
    graph_api: bool = False
    minimum_memory_mb: int = 0
    ane_support: bool = False

    def __post_init__(self) -> None:
        if self.minimum_memory_mb < 0:
            raise InputError(f"CapabilityRequirements.minimum_memory_mb must be >= 0, got {self.minimum_memory_mb}")


def requirement_mismatches(req: CapabilityRequirements, device: Device | None, *, ane_available: bool | None,
                           memory_mb: float | None = None, host: str = "this host") -> list[str]:
    """Every way ``device`` (a seed capability-matrix row, or None when the host has none) misses ``req``."""
    out: list[str] = []
    checks: Sequence[tuple[bool, str, str | None]] = [
        (req.neural_network_support, "neural_network_support", device.neural_networks if device else None),
        (req.matrix_multiplication, "matrix_multiplication", device.matrix_ops if device else None),
        (req.convolution_support, "convolution_support", device.convolution if device else None),
    ]
    for wanted, name, level in checks:
        if not wanted:
            continue
        if device is None:
            out.append(f"{name}: required; {host} has no GPU device in the capability matrix")
        elif level != "full":
            out.append(f"{name}: required; {device.name} has {level} support ({device.source})")
    if req.graph_api:
        if device is None:
            out.append(f"graph_api: required; {host} has no GPU device in the capability matrix")
        elif not device.graph_api:
            out.append(f"graph_api: required; {device.name} has none ({device.source})")
    if req.minimum_memory_mb > 0:
        limit = device.memory_limit_mb if device is not None and device.memory_limit_mb is not None else memory_mb
        what = f"{device.name} memory limit" if device is not None and device.memory_limit_mb is not None else f"{host} memory"
        if limit is None:
            out.append(f"minimum_memory_mb: requires {req.minimum_memory_mb} MB; {what} is unknown")
        elif limit < req.minimum_memory_mb:
            out.append(f"minimum_memory_mb: requires {req.minimum_memory_mb} MB; {what} is {limit:g} MB")
    if req.ane_support and ane_available is not True:
        state = "unknown" if ane_available is None else "not available"
        out.append(f"ane_support: required; the Apple Neural Engine is {state} on {host}")
    return out


def validate_operation_requirements(req: CapabilityRequirements, device: str | Device | None = None, *,
                                    ane_available: bool | None = None, memory_mb: float | None = None,
                                    db: CapabilityDatabase | None = None) -> None:
    """Raise :class:`CapabilityMismatchError` listing every requirement the device does not meet.

    With ``device=None`` the current platform is checked: its chip's GPU row of the seed's matrix
    (none off Apple silicon), whether the ANE is available, and its total memory.
    """
    db = db or default_database()
    host = "this host"
    if device is None:
        from bitnet_coreml.check.platform import DeviceCompatibilityChecker

        info = DeviceCompatibilityChecker.get_platform_info(db=db)
        dev = db.devices.get(info.gpu_device) if info.gpu_device else None
        ane_available = info.ane_available if ane_available is None else ane_available
        memory_mb = info.memory_total_mb if memory_mb is None else memory_mb
        host = f"this host ({info.os_name} {info.os_version}, {info.chip or 'unknown chip'})"
    else:
        dev = device if isinstance(device, Device) else db.device(device)
        host = dev.name
    mismatches = requirement_mismatches(req, dev, ane_available=ane_available, memory_mb=memory_mb, host=host)
    if mismatches:
        raise CapabilityMismatchError(
            f"{host} does not meet the operation's requirements ({len(mismatches)}): " + "; ".join(mismatches),
            mismatches)
