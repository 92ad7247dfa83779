"""The project's vocabulary: one definition of the names users type and read (dependency-free).

* Targets (``ios``, ``macos``) and their deployment OS versions, spelled the way coremltools names
  them (``iOS17``, ``macOS14``; ``ct.target``), each with its Core ML specification version and the
  MIL opset (named by its iOS version) that programs for it use.
  Source: coremltools 9.0 ``converters/mil/_deployment_compatibility.py`` (``AvailableTarget``;
  macOS members are aliases of their iOS twins) and ``coremltools/__init__.py``; the capability
  database (``data/capabilities.toml``) carries the same rows with the same sources for the check.
* Compute units: one spelling (``ane``, ``gpu``, ``cpu``, ``reference``) and coremltools' names
  (``ct.ComputeUnit``: ``CPU_AND_NE``, ``CPU_AND_GPU``, ``CPU_ONLY``, ``ALL``).
* Embedding palettization bits.
* Deployment targets (:class:`Target`) and model input specs (:class:`InputSpec`).
* Op domains: ONNX's default domain spellings and the fused ops' domain.

Every parser here accepts the forms users type (``iOS17``, ``ios17``, ``iOS 17``, ``17``,
``macOS14.4``, ``CPU_AND_NE``) and every printer emits one form. Nothing here imports numpy,
coremltools or onnx, so the CLI can validate flags before loading anything heavy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, overload

from bitnet_coreml.errors import InputError

# --- op domains -------------------------------------------------------------------------------------

ONNX_DOMAINS = ("", "ai.onnx")  # how a node of the default ONNX domain spells it
DOMAIN = "bitnet_coreml"  # the fused ops' domain (BitLinear, RMSNorm, Relu2, KVCacheUpdate)


@overload
def onnx_opset(opset_imports: dict[str, int]) -> int | None: ...
@overload
def onnx_opset(opset_imports: dict[str, int], default: int) -> int: ...
def onnx_opset(opset_imports: dict[str, int], default: int | None = None) -> int | None:
    """The default ONNX domain's opset version from a model's (or graph's) opset imports, either spelling."""
    for domain in ONNX_DOMAINS:
        if domain in opset_imports:
            return opset_imports[domain]
    return default

# --- targets and OS versions -------------------------------------------------------------------------

TARGETS = ("ios", "macos")
DEFAULT_TARGET = "ios"
PLATFORM_NAMES = {"ios": "iOS", "macos": "macOS"}


@dataclass(frozen=True)
class OsVersion:
    """A deployment target coremltools knows: ``OsVersion("macos", 14, 8, 17)`` is ``macOS14``."""

    platform: str
    major: int
    spec_version: int
    ios: int  # the iOS version with the same spec version: names the MIL opset (iOS17 == macOS14)

    @property
    def name(self) -> str:
        """coremltools' spelling (``ct.target`` member name), e.g. ``"macOS14"``."""
        return f"{PLATFORM_NAMES[self.platform]}{self.major}"


# (iOS, macOS, spec version) of every target coremltools 9.0 defines from ML Programs on.
_ROWS = ((15, 12, 6), (16, 13, 7), (17, 14, 8), (18, 15, 9), (26, 26, 10))
OS_VERSIONS: tuple[OsVersion, ...] = tuple(
    OsVersion(platform, major, spec, ios)
    for platform in TARGETS
    for ios, mac, spec in _ROWS
    for major in ((ios,) if platform == "ios" else (mac,))
)
# constexpr_lut_to_dense (2-bit ternary weights) needs Core ML spec 7: iOS16 / macOS13.
MIN_CONVERT_SPEC = 7

_OS_RE = re.compile(r"^\s*(ios|macos|mac\s*os|osx)?\s*[-_ ]?\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?\s*$", re.I)


def os_versions(platform: str, *, convertible: bool = False) -> list[OsVersion]:
    """The known versions of ``platform``, oldest first (``convertible``: the converter can emit them)."""
    rows = [o for o in OS_VERSIONS if o.platform == platform]
    return [o for o in rows if o.spec_version >= MIN_CONVERT_SPEC] if convertible else rows


def os_names(platform: str | None = None, *, convertible: bool = False) -> str:
    """The accepted names, for error messages: ``"iOS16, iOS17, ..."``."""
    plats = [platform] if platform else list(TARGETS)
    return ", ".join(o.name for p in plats for o in os_versions(p, convertible=convertible))


@dataclass(frozen=True)
class MinOs:
    """A parsed ``--min-os``: what the user asked for and the deployment target that serves it."""

    platform: str
    version: str  # as asked, normalised: "14.4", "17"
    target: OsVersion  # the newest known target not newer than ``version``

    @property
    def name(self) -> str:
        return self.target.name


def parse_os(text: str | int, platform: str | None = None, *, what: str = "--min-os",
             convertible: bool = False) -> MinOs:
    """Parse a minimum OS in any form users type: ``iOS17``, ``ios17``, ``iOS 17``, ``17``, ``macOS14.4``.

    ``platform`` is the target given separately (``--target``); a bare number needs it, and a name
    of the other platform is refused (``--target macos --min-os iOS17``). A version between two known
    targets (``macOS14.4``) is served by the older one (``macOS14``).
    """
    raw = str(text)
    m = _OS_RE.match(raw)
    if m is None:
        raise InputError(f"{what} {raw!r} is not an OS version; write it like iOS17, macOS14 or macOS14.4")
    named = m.group(1)
    if named is not None:
        named_platform = "ios" if named.lower() == "ios" else "macos"
        if platform is not None and platform != named_platform:
            raise InputError(f"{what} {raw!r} names {PLATFORM_NAMES[named_platform]} but the target is "
                             f"{platform}; give --target {named_platform} or a {PLATFORM_NAMES[platform]} version")
        platform = named_platform
    if platform is None:
        platform = DEFAULT_TARGET
    if platform not in TARGETS:
        raise InputError(f"target {platform!r} is not supported; allowed: {', '.join(TARGETS)}")
    parts = [int(g) for g in m.groups()[1:] if g is not None]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    version = ".".join(map(str, parts))
    rows = [o for o in os_versions(platform, convertible=convertible) if o.major <= parts[0]]
    if not rows:
        raise InputError(f"{what} {raw!r}: {PLATFORM_NAMES[platform]} {version} is older than every supported "
                         f"target; allowed: {os_names(platform, convertible=convertible)} or newer")
    return MinOs(platform, version, rows[-1])


def os_for_spec(spec_version: int, platform: str = DEFAULT_TARGET) -> OsVersion | None:
    """The target of ``platform`` whose spec version is ``spec_version`` (None if unknown)."""
    return next((o for o in OS_VERSIONS if o.platform == platform and o.spec_version == spec_version), None)


def os_for_ios(ios: int, platform: str = DEFAULT_TARGET) -> OsVersion:
    """The target of ``platform`` whose MIL opset is iOS ``ios`` (``17, "macos"`` -> ``macOS14``)."""
    for o in OS_VERSIONS:
        if o.platform == platform and o.ios == ios:
            return o
    raise InputError(f"deployment target iOS{ios} is not supported; allowed: {os_names('ios', convertible=True)}")


def os_name_for_spec(spec_version: int) -> str:
    """``"iOS17 / macOS14"`` for spec 8; ``"Core ML spec N"`` when no target has it."""
    names = [o.name for o in OS_VERSIONS if o.spec_version == spec_version]
    return " / ".join(names) if names else f"Core ML spec {spec_version}"


@dataclass(frozen=True)
class Target:
    """Where a package must run: ``platform`` (``ios``/``macos``), optionally a chip (``"A17 Pro"``, ``"M1"``)
    and a minimum OS version as written (``"16"``, ``"14.4"``). The one target of ``check``, ``convert`` and
    pipelines; ``bitnet_coreml.check.target.resolve`` looks it up in the capability database.

    Without ``min_os`` the converter picks the oldest deployment target the program needs.
    """

    platform: str
    chip: str | None = None
    min_os: str | None = None

    def __post_init__(self) -> None:
        if self.platform not in TARGETS:
            raise InputError(f"target platform {self.platform!r} is not supported; allowed: {', '.join(TARGETS)}")

    @property
    def label(self) -> str:
        """``macos14-m1``: the platform, the minimum OS and the chip (lower case, no spaces)."""
        base = f"{self.platform}{self.min_os or ''}"
        return f"{base}-{self.chip.lower().replace(' ', '')}" if self.chip else base

    @property
    def convert_min_os(self) -> str | None:
        """The minimum OS in coremltools' spelling, e.g. ``"macOS14"``."""
        return f"{PLATFORM_NAMES[self.platform]}{self.min_os}" if self.min_os else None


@dataclass(frozen=True, eq=False)
class InputSpec:
    """A declared input (or state) of a model: the one spec of the executor, the runtime and the jobs.

    ``shape``: the default shape (``None`` for a flexible dimension); ``dtype``: a numpy dtype. A flexible
    Core ML input lists the shapes it allows (``enumerated``) or each dimension's range (``ranges``:
    ``(lower, upper)``, upper -1 = unbounded). Unpacks and compares as ``(shape, dtype)``
    (``shape, dtype = spec``), as the executor's specs always have.
    """

    shape: tuple[int | None, ...]
    dtype: Any
    enumerated: tuple[tuple[int, ...], ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()
    name: str = ""

    def _key(self) -> tuple[Any, ...]:
        return (self.shape, self.dtype, self.enumerated, self.ranges, self.name)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.shape, self.dtype))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, InputSpec):
            return self._key() == other._key()
        if isinstance(other, tuple):
            return (self.shape, self.dtype) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def shape_ok(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of ``shape`` fits this input."""
        if self.enumerated:
            return shape in self.enumerated
        if self.ranges:
            return len(shape) == len(self.ranges) and all(
                lo <= d and (hi < 0 or d <= hi) for d, (lo, hi) in zip(shape, self.ranges, strict=True))
        return shape == self.shape

    def allowed_shapes(self) -> str:
        """The shapes it takes, for error messages: ``[1, 16]``, ``[1, 8] or [1, 16]``, ``[1..4, 16]``."""
        if self.enumerated:
            return " or ".join(str(list(s)) for s in self.enumerated)
        if self.ranges:
            return "[" + ", ".join(f"{lo}..{'inf' if hi < 0 else hi}" for lo, hi in self.ranges) + "]"
        return str(list(self.shape))


def resolve_target(target: str | None, min_os: str | None) -> tuple[str, MinOs | None]:
    """``--target`` and ``--min-os`` together: the platform (default ``ios``, or the one ``min_os`` names)."""
    if target is not None and target not in TARGETS:
        raise InputError(f"--target {target!r} is not supported; allowed: {', '.join(TARGETS)}")
    parsed = parse_os(min_os, target) if min_os is not None else None
    platform = parsed.platform if parsed is not None else (target or DEFAULT_TARGET)
    return platform, parsed


# --- compute units ----------------------------------------------------------------------------------

UNITS = ("ane", "gpu", "cpu", "reference")
HARDWARE_UNITS = ("ane", "gpu", "cpu")
# coremltools' ct.ComputeUnit member used to run a package on each unit.
COREML_UNITS = {"ane": "CPU_AND_NE", "gpu": "CPU_AND_GPU", "cpu": "CPU_ONLY"}
_UNIT_ALIASES = {
    **{v.lower(): k for k, v in COREML_UNITS.items()},
    "ne": "ane", "neural_engine": "ane", "neuralengine": "ane", "cpu_only": "cpu", "ref": "reference",
    "numpy": "reference",
}


def parse_unit(text: str) -> str:
    """A compute unit in any spelling (``ane``, ``ANE``, ``CPU_AND_NE``) -> ``"ane"``."""
    key = re.sub(r"[\s-]+", "_", str(text).strip()).lower()
    unit = key if key in UNITS else _UNIT_ALIASES.get(key)
    if unit is None:
        raise InputError(f"unknown compute unit {text!r}; allowed: {', '.join(UNITS)} "
                         f"(or coremltools' {', '.join(COREML_UNITS.values())})")
    return unit


def parse_units(text: str) -> tuple[str, ...]:
    """A comma-separated unit chain (``"ane,gpu,cpu,reference"``) in canonical spelling."""
    return tuple(parse_unit(u) for u in str(text).split(",") if u.strip())


# --- palettization ----------------------------------------------------------------------------------

# Bits of the palettized (lookup-table) embedding / lm_head: coremltools' palettizer supports 1-8 bits;
# 4, 6 and 8 are the ones offered (fewer bits cost accuracy fast: `check` warns below 8).
EMBED_BITS = (4, 6, 8)


def parse_embed_bits(value: int | str | None, what: str = "--embed-bits") -> int | None:
    """Validate an embedding bit width (None = keep fp16)."""
    if value is None:
        return None
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = -1
    if bits not in EMBED_BITS:
        raise InputError(f"{what} {value!r} is not allowed; allowed: {', '.join(map(str, EMBED_BITS))}")
    return bits
