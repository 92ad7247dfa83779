"""The capability database: ANE generations, chips, devices, OS versions, features, limits, unit rules.

The data lives in ``bitnet_coreml/data/capabilities.toml`` (shipped in the wheel); every row has a
``source``. A user can add or override rows with their own TOML files (``--capabilities FILE``):
rows with the same key replace the bundled row field by field, new keys add rows. Every file is
validated on load: an unknown section or key, a wrong type, a missing ``source`` or a dangling
reference (a chip naming an unknown generation) is a :class:`~bitnet_coreml.errors.ConfigError`
naming the file, the row and the key.

This module imports neither onnx nor coremltools, so the runtime can use it cheaply.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bitnet_coreml.errors import ConfigError, InputError
from bitnet_coreml.vocab import PLATFORM_NAMES

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover  (Python 3.10)
    import tomli as tomllib  # type: ignore[no-redef]

BUNDLED = "capabilities.toml"
PLATFORMS = ("ios", "macos")
UNITS = ("ANE", "GPU", "CPU")
SEVERITIES = ("error", "warning")
DATA_TYPES = ("fp16", "int8", "int16", "uint8", "fp32")
SUPPORT_LEVELS = ("full", "limited", "none")
MIB = 1 << 20

_NUM = (int, float)
_STR_LIST = "list[str]"
_INT_LIST = "list[int]"

# section -> (key fields, {field: (type, required)})
_ROW_SPECS: dict[str, tuple[tuple[str, ...], dict[str, tuple[Any, bool]]]] = {
    "ane_generation": (("id",), {
        "id": (int, True), "tops": (_NUM, False), "data_types": (_STR_LIST, True),
        "model_size_budget_mb": (_NUM, False), "seed_chips": (str, False), "source": (str, True)}),
    "chip": (("name",), {
        "name": (str, True), "platforms": (_STR_LIST, True), "ane_generation": (int, False),
        "tops": (_NUM, False), "int8_compute": (bool, False), "gpu": (str, False), "source": (str, True)}),
    "device": (("name",), {
        "name": (str, True), "neural_networks": (str, True), "matrix_ops": (str, True), "convolution": (str, True),
        "graph_api": (bool, True), "memory_limit_mb": (_NUM, False), "source": (str, True)}),
    "os": (("platform", "version"), {
        "platform": (str, True), "version": (str, True), "spec_version": (int, True), "core_ml": (str, False),
        "mil_opset": (str, True), "source": (str, True)}),
    "feature": (("name",), {"name": (str, True), "min_spec_version": (int, True), "source": (str, True)}),
    # what each field does: bitnet_coreml.opsupport (the matcher vocabulary) and docs/check.md
    "unit_rule": (("id",), {
        "id": (str, True), "match": (str, True), "ops": (_STR_LIST, False), "excludes": (_STR_LIST, False),
        "unit": (str, False), "reason": (str, True), "source": (str, True), "attribute": (str, False),
        "above": (_NUM, False), "dtypes": (_STR_LIST, False)}),
}

# limit name -> {field: (type, required)}; every limit also has severity and source.
_LIMIT_SPECS: dict[str, dict[str, tuple[Any, bool]]] = {
    "package_bytes": {"ios": (int, True), "macos": (int, True)},
    "ane_generation_budget": {},
    "gpu_memory": {},
    "max_dimension": {"value": (int, True)},
    "max_rank": {"value": (int, True)},
    "max_channels": {"value": (int, True)},
    "max_conv_kernel_width": {"value": (int, True)},
    "lut_bits": {"values": (_INT_LIST, True)},
    "int8_compute": {},
    "flexible_shapes": {"enumerated_max": (int, True)},
    "fp16_range": {"max": (_NUM, True), "min_subnormal": (_NUM, True)},
    "state_dtype": {"value": (str, True)},
    "state_dim_multiple": {"value": (int, True)},
    "stateful_context": {},
}
_LIMIT_COMMON = {"severity": (str, True), "source": (str, True)}


def chip_key(name: str) -> str:
    """Normalised chip name: ``"A17 Pro"``, ``"a17pro"`` and ``"Apple A17-Pro"`` are the same chip."""
    k = re.sub(r"[\s_\-]+", "", name).lower()
    return k[5:] if k.startswith("apple") else k


def version_tuple(v: str) -> tuple[int, ...]:
    """``"14.4"`` -> ``(14, 4)``; raises ValueError on anything else."""
    parts = v.strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(v)
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class AneGeneration:
    id: int
    data_types: tuple[str, ...]
    source: str
    tops: float | None = None
    model_size_budget_mb: float | None = None
    seed_chips: str = ""


@dataclass(frozen=True)
class Chip:
    name: str
    platforms: tuple[str, ...]
    source: str
    ane_generation: int | None = None
    tops: float | None = None
    int8_compute: bool | None = None
    gpu: str | None = None


@dataclass(frozen=True)
class Device:
    name: str
    neural_networks: str
    matrix_ops: str
    convolution: str
    graph_api: bool
    source: str
    memory_limit_mb: float | None = None


@dataclass(frozen=True)
class OsVersion:
    platform: str
    version: str
    spec_version: int
    mil_opset: str
    source: str
    core_ml: str = ""

    @property
    def label(self) -> str:
        """coremltools' spelling, as everywhere in the project (``bitnet_coreml.vocab``): ``"macOS14"``."""
        return f"{PLATFORM_NAMES.get(self.platform, self.platform)}{self.version}"


@dataclass(frozen=True)
class Feature:
    name: str
    min_spec_version: int
    source: str


@dataclass(frozen=True)
class UnitRule:
    """A ``[[unit_rule]]`` row: where ``match`` (a :data:`bitnet_coreml.opsupport.MATCHERS` name) holds for a
    node of one of ``ops`` (empty: any op), the node cannot run on ``excludes``; ``unit`` is where it lands."""

    id: str
    ops: tuple[str, ...]
    match: str
    excludes: tuple[str, ...]
    unit: str
    reason: str
    source: str
    attribute: str | None = None
    above: float | None = None
    dtypes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limit:
    name: str
    severity: str
    source: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


@dataclass(frozen=True)
class CapabilityDatabase:
    """The merged, validated database. Look-ups raise :class:`InputError` listing what exists."""

    generations: Mapping[int, AneGeneration]
    chips: Mapping[str, Chip]  # by chip_key
    devices: Mapping[str, Device]
    os_versions: tuple[OsVersion, ...]
    features: Mapping[str, Feature]
    limits: Mapping[str, Limit]
    unit_rules: Mapping[str, UnitRule]
    files: tuple[str, ...]

    def chip(self, name: str) -> Chip:
        c = self.chips.get(chip_key(name))
        if c is None:
            known = ", ".join(ch.name for ch in self.chips.values())
            raise InputError(f"unknown chip {name!r}; known chips: {known} (add one with --capabilities FILE)")
        return c

    def generation(self, gen_id: int) -> AneGeneration:
        g = self.generations.get(gen_id)
        if g is None:
            raise InputError(f"unknown ANE generation {gen_id}; known: {', '.join(map(str, sorted(self.generations)))}")
        return g

    def device(self, name: str) -> Device:
        d = self.devices.get(name)
        if d is None:
            raise InputError(f"unknown device {name!r}; known devices: {', '.join(self.devices)}")
        return d

    def limit(self, name: str) -> Limit:
        return self.limits[name]

    def feature(self, name: str) -> Feature:
        return self.features[name]

    def os_versions_for(self, platform: str) -> list[OsVersion]:
        return sorted((o for o in self.os_versions if o.platform == platform), key=lambda o: version_tuple(o.version))

    def os_version(self, platform: str, version: str) -> OsVersion:
        """The newest listed OS row of ``platform`` whose version is <= ``version`` (``"14.4"`` -> macOS 14)."""
        try:
            want = version_tuple(version)
        except ValueError:
            raise InputError(f"bad OS version {version!r}; expected digits like 16 or 14.4") from None
        rows = self.os_versions_for(platform)
        match = [o for o in rows if version_tuple(o.version) <= want]
        if not match:
            known = ", ".join(o.version for o in rows)
            raise InputError(f"{platform} {version} is older than every OS version in the capability database "
                             f"({known}); ML Programs need one of those")
        return match[-1]

    def lowest_os(self, platform: str, min_spec_version: int) -> OsVersion | None:
        for o in self.os_versions_for(platform):
            if o.spec_version >= min_spec_version:
                return o
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "ane_generations": [asdict(g) for g in sorted(self.generations.values(), key=lambda g: g.id)],
            "chips": [asdict(c) for c in self.chips.values()],
            "devices": [asdict(d) for d in self.devices.values()],
            "os_versions": [asdict(o) for o in self.os_versions],
            "features": [asdict(f) for f in self.features.values()],
            "limits": {k: {"severity": v.severity, "source": v.source, **dict(v.values)} for k, v in self.limits.items()},
            "unit_rules": [asdict(u) for u in self.unit_rules.values()],
        }


# --- loading and validation ---------------------------------------------------------------------------


def _type_ok(value: Any, spec: Any) -> bool:
    if spec == _STR_LIST:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if spec == _INT_LIST:
        return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if spec is int or spec == (int,):
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, spec)


def _type_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if spec == _NUM:
        return "number"
    return spec.__name__


def _check_fields(where: str, row: Mapping[str, Any], spec: Mapping[str, tuple[Any, bool]]) -> None:
    for k, v in row.items():
        if k not in spec:
            raise ConfigError(f"{where}: unknown key {k!r}; allowed: {', '.join(spec)}")
        if not _type_ok(v, spec[k][0]):
            raise ConfigError(f"{where}.{k}: expected {_type_name(spec[k][0])}, got {type(v).__name__} {v!r}")
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, (int, float)) and not isinstance(x, bool) and x < 0 for x in values):
            raise ConfigError(f"{where}.{k}: {v!r} is negative; sizes, counts and limits must be >= 0")


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: capability file not found")
    from bitnet_coreml._files import load_toml

    return load_toml(path, "capability file", error=ConfigError)


def _merge(state: dict[str, Any], doc: Mapping[str, Any], name: str) -> None:
    """Merge one parsed file into ``state`` (rows by key, limits by name), validating field names/types."""
    for section, value in doc.items():
        if section == "schema_version":
            if value != 1:
                raise ConfigError(f"{name}: schema_version {value!r} is not supported; expected 1")
            continue
        if section == "limits":
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: [limits] must be a table")
            for lname, lval in value.items():
                if lname not in _LIMIT_SPECS:
                    raise ConfigError(f"{name}: unknown limit {lname!r}; known: {', '.join(_LIMIT_SPECS)}")
                if not isinstance(lval, dict):
                    raise ConfigError(f"{name}: limits.{lname} must be a table")
                _check_fields(f"{name}: limits.{lname}", lval, {**_LIMIT_SPECS[lname], **_LIMIT_COMMON})
                state["limits"].setdefault(lname, {}).update(lval)
            continue
        if section not in _ROW_SPECS:
            what = (f"[[{section}]] row 0" if isinstance(value, list) and value
                    else f"[{section}]" if isinstance(value, dict) else f"key {section!r}")
            raise ConfigError(f"{name}: {what}: unknown section {section!r} (no such kind of row); known: "
                              f"{', '.join([*_ROW_SPECS, 'limits'])}")
        keys, spec = _ROW_SPECS[section]
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise ConfigError(f"{name}: {section} must be an array of tables ([[{section}]])")
        seen: set[tuple[Any, ...]] = set()
        for i, row in enumerate(value):
            where = f"{name}: {section}[{i}]"
            missing = [k for k in keys if k not in row]
            if missing:
                raise ConfigError(f"{where}: missing key {missing[0]!r} (rows are identified by {', '.join(keys)})")
            _check_fields(where, row, spec)
            key = tuple(chip_key(row[k]) if (section, k) == ("chip", "name") else row[k] for k in keys)
            if key in seen:
                raise ConfigError(f"{where}: duplicate {section} {'/'.join(map(str, key))} in the same file")
            seen.add(key)
            state[section].setdefault(key, {}).update(row)
            state["origin"][(section, key)] = f"{name}: {section} {'/'.join(map(str, key))!r}"


def _build(state: dict[str, Any], files: tuple[str, ...]) -> CapabilityDatabase:
    def require(section: str, row: Mapping[str, Any]) -> None:
        spec = _ROW_SPECS[section][1]
        for k, (_, req) in spec.items():
            if req and k not in row:
                ident = "/".join(str(row[k2]) for k2 in _ROW_SPECS[section][0])
                raise ConfigError(f"{files[-1]}: {section} {ident!r}: missing required key {k!r}")

    gens: dict[int, AneGeneration] = {}
    for row in state["ane_generation"].values():
        require("ane_generation", row)
        bad = [t for t in row["data_types"] if t not in DATA_TYPES]
        if bad:
            raise ConfigError(f"ane_generation {row['id']}: unknown data type {bad[0]!r}; allowed: {', '.join(DATA_TYPES)}")
        gens[row["id"]] = AneGeneration(**{**row, "data_types": tuple(row["data_types"])})
    devices: dict[str, Device] = {}
    for row in state["device"].values():
        require("device", row)
        for k in ("neural_networks", "matrix_ops", "convolution"):
            if row[k] not in SUPPORT_LEVELS:
                raise ConfigError(f"device {row['name']!r}.{k}: {row[k]!r} not one of {', '.join(SUPPORT_LEVELS)}")
        devices[row["name"]] = Device(**row)
    chips: dict[str, Chip] = {}
    for key, row in state["chip"].items():
        require("chip", row)
        bad = [p for p in row["platforms"] if p not in PLATFORMS]
        if bad:
            raise ConfigError(f"chip {row['name']!r}.platforms: {bad[0]!r} not one of {', '.join(PLATFORMS)}")
        if row.get("ane_generation") is not None and row["ane_generation"] not in gens:
            raise ConfigError(f"chip {row['name']!r}.ane_generation: {row['ane_generation']} is not a known generation "
                              f"({', '.join(map(str, sorted(gens)))})")
        if row.get("gpu") is not None and row["gpu"] not in devices:
            raise ConfigError(f"chip {row['name']!r}.gpu: {row['gpu']!r} is not a device row ({', '.join(devices)})")
        chips[key[0]] = Chip(**{**row, "platforms": tuple(row["platforms"])})
    oses: list[OsVersion] = []
    for row in state["os"].values():
        require("os", row)
        if row["platform"] not in PLATFORMS:
            raise ConfigError(f"os {row['version']!r}.platform: {row['platform']!r} not one of {', '.join(PLATFORMS)}")
        try:
            version_tuple(row["version"])
        except ValueError:
            raise ConfigError(f"os {row['platform']} {row['version']!r}: version must be digits like 16 or 14.4") from None
        oses.append(OsVersion(**row))
    features: dict[str, Feature] = {}
    for row in state["feature"].values():
        require("feature", row)
        features[row["name"]] = Feature(**row)
    rules = {key[0]: _unit_rule(row, state["origin"][("unit_rule", key)]) for key, row in state["unit_rule"].items()}
    limits: dict[str, Limit] = {}
    for lname, spec in _LIMIT_SPECS.items():
        row = state["limits"].get(lname)
        if row is None:
            raise ConfigError(f"capability database: limit {lname!r} is missing")
        for k, (_, req) in {**spec, **_LIMIT_COMMON}.items():
            if req and k not in row:
                raise ConfigError(f"{files[-1]}: limits.{lname}: missing required key {k!r}")
        if row["severity"] not in SEVERITIES:
            raise ConfigError(f"limits.{lname}.severity: {row['severity']!r} not one of {', '.join(SEVERITIES)}")
        limits[lname] = Limit(lname, row["severity"], row["source"],
                              MappingProxyType({k: v for k, v in row.items() if k not in ("severity", "source")}))
    for needed in ("mlprogram", "constexpr_lut_to_dense"):
        if needed not in features:
            raise ConfigError(f"capability database: feature {needed!r} is missing")
    ro = MappingProxyType  # the database is shared (cached): read-only views keep callers from mutating it
    return CapabilityDatabase(ro(gens), ro(chips), ro(devices), tuple(oses), ro(features), ro(limits), ro(rules), files)


def _empty_state() -> dict[str, Any]:
    return {s: {} for s in [*_ROW_SPECS, "limits", "origin"]}


def _unit_rule(row: Mapping[str, Any], where: str) -> UnitRule:
    """Validate a merged ``[[unit_rule]]`` row (``where``: the file and row that last set it)."""
    from bitnet_coreml.opsupport import MATCHERS, UNIT_ORDER  # the matcher vocabulary

    for k in ("match", "reason", "source"):
        if k not in row:
            raise ConfigError(f"{where}: missing required key {k!r}")
    m = MATCHERS.get(row["match"])
    if m is None:
        raise ConfigError(f"{where}: unknown matcher match = {row['match']!r}; known: {', '.join(MATCHERS)}")
    missing = [p for p in m.params if row.get(p) in (None, "", [])]
    if missing:
        raise ConfigError(f"{where}: matcher {row['match']!r} needs {' and '.join(repr(p) for p in missing)}")
    if "excludes" in row:
        excludes = tuple(row["excludes"])
        bad = [u for u in excludes if u not in UNIT_ORDER[:-1]]
        if bad or not excludes:
            raise ConfigError(f"{where}: excludes = {list(excludes)!r}; give one or more of "
                              f"{', '.join(UNIT_ORDER[:-1])} (CPU runs every op)")
        unit = next(u for u in UNIT_ORDER if u not in excludes)
        if row.get("unit", unit) != unit:
            raise ConfigError(f"{where}: unit = {row['unit']!r} contradicts excludes = {list(excludes)!r} "
                              f"(an op lands on the first unit not excluded: {unit})")
    elif "unit" in row:
        unit = row["unit"]
        if unit not in UNIT_ORDER[1:]:
            raise ConfigError(f"{where}: unit = {unit!r} not one of {', '.join(UNIT_ORDER[1:])}")
        excludes = UNIT_ORDER[:UNIT_ORDER.index(unit)]
    else:
        raise ConfigError(f"{where}: give excludes (the units the matched ops cannot run on) or unit")
    return UnitRule(id=row["id"], ops=tuple(row.get("ops", ())), match=row["match"], excludes=excludes, unit=unit,
                    reason=row["reason"], source=row["source"], attribute=row.get("attribute"),
                    above=row.get("above"), dtypes=tuple(row.get("dtypes", ())))


@functools.lru_cache(maxsize=1)
def _bundled_doc() -> dict[str, Any]:
    # a plain path (not importlib.resources, whose import alone costs ~40 ms): the file ships in the wheel
    with open(Path(__file__).resolve().parent.parent / "data" / BUNDLED, "rb") as f:
        return tomllib.load(f)


def load_capabilities(*user_files: str | os.PathLike[str]) -> CapabilityDatabase:
    """The bundled database, with each of ``user_files`` merged over it in order.

    Raises :class:`ConfigError` (exit 2) naming the file, row and key of the first problem found.
    """
    state = _empty_state()
    _merge(state, _bundled_doc(), BUNDLED)
    files = [f"bitnet_coreml/data/{BUNDLED}"]
    for f in user_files:
        p = Path(f)
        _merge(state, _read(p), str(p))
        files.append(str(p))
    return _build(state, tuple(files))


@functools.lru_cache(maxsize=1)
def default_database() -> CapabilityDatabase:
    """The bundled database alone (cached)."""
    return load_capabilities()


def iter_sources(db: CapabilityDatabase) -> Iterable[tuple[str, str]]:
    """(row, source) pairs of every row: used to show and test that every row cites its source."""
    for g in db.generations.values():
        yield f"ane_generation {g.id}", g.source
    for c in db.chips.values():
        yield f"chip {c.name}", c.source
    for d in db.devices.values():
        yield f"device {d.name}", d.source
    for o in db.os_versions:
        yield f"os {o.label}", o.source
    for ft in db.features.values():
        yield f"feature {ft.name}", ft.source
    for lm in db.limits.values():
        yield f"limit {lm.name}", lm.source
    for u in db.unit_rules.values():
        yield f"unit_rule {u.id}", u.source
