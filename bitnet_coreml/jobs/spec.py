"""Pipeline files (``pipelines/*.toml``): the schema, validated on load.

A pipeline lists models to build; each model has a source, one or more targets, conversion
options, a check policy and verify thresholds. ``[defaults]`` gives values every model inherits.
Relative paths are relative to the pipeline file's folder, so a pipeline builds the same from any
working directory. The reference with every key is ``docs/pipelines.md``.

Every problem is a :class:`ConfigError` (exit 2) whose one line names the file, the key and what is
allowed; unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitnet_coreml.errors import ConfigError, InputError
from bitnet_coreml.frontend import builds_graph, source_problem
from bitnet_coreml.vocab import EMBED_BITS, PLATFORM_NAMES, Target, parse_os

FORMAT_VERSION = 1
PRECISIONS = ("fp16", "fp32")
CHECK_POLICIES = ("strict", "warn")
OUTPUT_FIELDS = ("name", "target", "os", "min_os", "chip")

# The OS families a package can target and their spelling; OS versions are parsed by the project's
# vocabulary (``bitnet_coreml.vocab``: ``14``, ``"14.4"``, ``"macOS14"``) and limited to the targets
# the converter emits. Chips are validated against the check stage's capability database.
PLATFORMS: dict[str, str] = PLATFORM_NAMES
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,2}$")


@dataclass(frozen=True)
class VerifySpec:
    """Parity policy against the source run by ONNX Runtime; None = the verifier's default for the precision."""

    enabled: bool = True
    inputs: Path | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    min_top5: float | None = None
    max_rel_l2: float | None = None

    def thresholds(self) -> dict[str, float]:
        """Overrides in :class:`bitnet_coreml.verify.Thresholds` field names."""
        names = {"min_cosine": "cosine", "min_top1": "top1", "min_top5": "top5", "max_rel_l2": "rel_l2"}
        return {names[k]: v for k, v in asdict(self).items() if k in names and v is not None}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: Path
    targets: tuple[Target, ...]
    precision: str = "fp16"
    embed_bits: int | None = None
    calibration: Path | None = None
    check: str = "strict"
    verify: VerifySpec = field(default_factory=VerifySpec)
    output: str = "{name}-{target}.mlpackage"
    seq_len: int | None = None  # checkpoint / GGUF sources only (None for ONNX files, which carry their own shapes)
    allow_dequant: bool = False  # GGUF sources: dequantise other ggml types instead of refusing
    # checkpoint / GGUF sources only: a stateful package (convert --stateful) with these settings
    # (context, prefill, prefill_logits); None: a stateless one
    stateful: dict[str, Any] | None = None
    capabilities: tuple[Path, ...] = ()  # extra capability files (chips, limits) merged over the bundled database
    chunks: int | str | None = None  # a chunked model folder (convert --chunks N|auto); None: one package

    def output_name(self, target: Target) -> str:
        return self.output.format(name=self.name, target=target.label, os=target.platform, min_os=target.min_os or "any",
                                  chip=target.chip or "any")

    def canonical(self, target: Target, base: Path) -> dict[str, Any]:
        """This entry for one target as plain data (paths relative to ``base``): part of the build key."""
        d = asdict(self)
        d["targets"] = None
        # the key names of the pipeline file (``os``), in the order build keys have always had
        d["target"] = {"os": target.platform, "min_os": target.min_os, "chip": target.chip}
        for key in ("seq_len", "stateful"):
            if d[key] is None:
                del d[key]  # entries without it keep the build keys they had before the key existed
        if not d["allow_dequant"]:
            del d["allow_dequant"]  # likewise
        if not d["capabilities"]:
            del d["capabilities"]  # likewise
        if d["chunks"] is None:
            del d["chunks"]  # likewise

        def rel(p: Any) -> Any:
            if isinstance(p, Path):
                try:
                    return p.resolve().relative_to(base.resolve()).as_posix()
                except ValueError:
                    return str(p.resolve())
            if isinstance(p, dict):
                return {k: rel(v) for k, v in p.items()}
            return p

        return rel(d)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Pipeline:
    path: Path
    output_dir: Path
    models: tuple[ModelEntry, ...]


# --- loading --------------------------------------------------------------------------------------

_TOP_KEYS = ("version", "output_dir", "defaults", "model")
_MODEL_KEYS = ("name", "source", "targets", "precision", "embed_bits", "calibration", "check", "verify", "output",
               "seq_len", "allow_dequant", "stateful", "capabilities", "chunks")
_STATEFUL_KEYS = ("context", "prefill", "prefill_logits")
_DEFAULT_KEYS = tuple(k for k in _MODEL_KEYS if k not in ("name", "source"))
_VERIFY_KEYS = ("enabled", "inputs", "min_cosine", "min_top1", "min_top5", "max_rel_l2")
_TARGET_KEYS = ("os", "min_os", "chip")


class _Ctx:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def fail(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {msg}")

    def keys(self, table: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table, found {_tname(table)}")
        for k in table:
            if k not in allowed:
                raise self.fail(where, f"unknown key '{k}'; allowed: {', '.join(allowed)}")
        return table

    def typed(self, value: Any, types: tuple[type, ...], where: str, what: str) -> Any:
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise self.fail(where, f"{_show(value)} is {_tname(value)}; allowed: {what}")
        return value

    def choice(self, value: Any, allowed: tuple[Any, ...], where: str) -> Any:
        if isinstance(value, bool) or value not in allowed:
            raise self.fail(where, f"{_show(value)} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return value

    def path_of(self, value: Any, where: str, *, must_exist: bool = True) -> Path:
        self.typed(value, (str,), where, "a path (string) relative to the pipeline file")
        p = Path(os.path.normpath(self.base / value))
        if must_exist and not p.exists():
            raise self.fail(where, f"'{value}' does not exist (resolved to {p}); give an existing file or folder")
        return p


def _tname(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    return repr(v) if not isinstance(v, (dict, list)) else _tname(v)


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and validate a pipeline file; raises :class:`ConfigError` (exit 2) on any problem."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: pipeline file not found")
    from bitnet_coreml._files import load_toml

    data = load_toml(p, "pipeline file", error=ConfigError)
    ctx = _Ctx(p)
    ctx.keys(data, _TOP_KEYS, "top level")
    version = data.get("version", FORMAT_VERSION)
    ctx.choice(version, (FORMAT_VERSION,), "version")
    output_dir = ctx.path_of(data.get("output_dir", "out"), "output_dir", must_exist=False)
    if output_dir.exists() and not output_dir.is_dir():
        raise ctx.fail("output_dir", f"{output_dir} exists and is not a folder; give a folder (it is created if missing)")
    defaults = ctx.keys(data.get("defaults", {}), _DEFAULT_KEYS, "defaults")
    models_raw = data.get("model")
    if not models_raw:
        raise ctx.fail("model", "no [[model]] entries; add at least one with 'name' and 'source'")
    ctx.typed(models_raw, (list,), "model", "an array of tables ([[model]])")
    models = tuple(_model(ctx, raw, defaults, i) for i, raw in enumerate(models_raw))
    _check_unique(ctx, models)
    return Pipeline(p, output_dir, models)


def _model(ctx: _Ctx, raw: Any, defaults: dict[str, Any], i: int) -> ModelEntry:
    where = f"model[{i}]"
    raw = ctx.keys(raw, _MODEL_KEYS, where)
    if "name" not in raw:
        raise ctx.fail(where, "missing key 'name'")
    name = ctx.typed(raw["name"], (str,), f"{where}.name", "a string")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ctx.fail(f"{where}.name", f"{name!r} is not allowed; allowed: letters, digits, '.', '_', '-'")
    where = f"model '{name}'"
    if "source" not in raw:
        raise ctx.fail(where, "missing key 'source' (an ONNX file, a Hugging Face BitNet checkpoint folder or a "
                              "GGUF file)")
    merged = {**defaults, **raw}
    merged_verify = {**defaults.get("verify", {}), **raw.get("verify", {})} \
        if isinstance(defaults.get("verify", {}), dict) and isinstance(raw.get("verify", {}), dict) \
        else raw.get("verify", defaults.get("verify"))
    source = ctx.path_of(raw["source"], f"{where}.source")
    problem = source_problem(source)
    if problem is not None:
        raise ctx.fail(f"{where}.source", problem)
    if "targets" not in merged:
        raise ctx.fail(where, "missing key 'targets' (e.g. targets = [{ os = \"macOS\", min_os = \"14\" }])")
    caps_raw = merged.get("capabilities", [])
    ctx.typed(caps_raw, (list,), f"{where}.capabilities", "a list of capability TOML files")
    capabilities = tuple(ctx.path_of(c, f"{where}.capabilities") for c in caps_raw)
    targets = _targets(ctx, merged["targets"], f"{where}.targets", capabilities)
    precision = ctx.choice(merged.get("precision", "fp16"), PRECISIONS, f"{where}.precision")
    embed_bits = merged.get("embed_bits")
    if embed_bits is not None:
        ctx.choice(embed_bits, EMBED_BITS, f"{where}.embed_bits")
    calibration = merged.get("calibration")
    cal_path = ctx.path_of(calibration, f"{where}.calibration") if calibration is not None else None
    if cal_path is not None and cal_path.suffix != ".npz":
        raise ctx.fail(f"{where}.calibration", f"'{calibration}' is not allowed; allowed: an .npz of sample inputs")
    check = ctx.choice(merged.get("check", "strict"), CHECK_POLICIES, f"{where}.check")
    verify = _verify(ctx, merged_verify or {}, f"{where}.verify")
    chunks = _chunks(ctx, merged.get("chunks"), f"{where}.chunks")
    default_output = ModelEntry.output.removesuffix(".mlpackage") if chunks is not None else ModelEntry.output
    output = ctx.typed(merged.get("output", default_output), (str,), f"{where}.output", "a string")
    _check_output(ctx, output, f"{where}.output", folder=chunks is not None)
    seq_len = merged.get("seq_len")
    if seq_len is not None:
        ctx.typed(seq_len, (int,), f"{where}.seq_len", "a positive integer (tokens)")
        if seq_len < 1:
            raise ctx.fail(f"{where}.seq_len", f"{seq_len} is out of range; allowed: a positive integer (tokens)")
        if not builds_graph(source):
            seq_len = None  # an ONNX file carries its own input shapes: the key does not apply
    allow_dequant = ctx.typed(merged.get("allow_dequant", False), (bool,), f"{where}.allow_dequant", "true or false")
    stateful = _stateful(ctx, raw.get("stateful"), source, verify, f"{where}.stateful")
    return ModelEntry(name, source, targets, precision, embed_bits, cal_path, check, verify, output, seq_len,
                      allow_dequant, stateful, capabilities, chunks)


def _chunks(ctx: _Ctx, raw: Any, where: str) -> int | str | None:
    """``chunks``: ``"auto"`` or a positive integer (``convert --chunks``)."""
    from bitnet_coreml.chunking import parse_chunks

    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ctx.fail(where, f"{raw!r} is not allowed; allowed: \"auto\" or a positive integer (pieces)")
    try:
        return parse_chunks(raw)
    except InputError:
        raise ctx.fail(where, f"{raw!r} is not allowed; allowed: \"auto\" or a positive integer (pieces)") from None


def _stateful(ctx: _Ctx, raw: Any, source: Path, verify: VerifySpec, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    raw = ctx.keys(raw, _STATEFUL_KEYS, where)
    if not builds_graph(source):
        raise ctx.fail(where, "needs a Hugging Face checkpoint folder or a .gguf file as source (convert --stateful)")
    out: dict[str, Any] = {"context": 512, "prefill": 64, "prefill_logits": "all"}
    for key in ("context", "prefill"):
        if key in raw:
            v = ctx.typed(raw[key], (int,), f"{where}.{key}", "a positive integer (tokens)")
            if v < 1:
                raise ctx.fail(f"{where}.{key}", f"{v} is out of range; allowed: a positive integer (tokens)")
            out[key] = v
    if "prefill_logits" in raw:
        out["prefill_logits"] = ctx.choice(raw["prefill_logits"], ("all", "last"), f"{where}.prefill_logits")
    return out


def _targets(ctx: _Ctx, raw: Any, where: str, capabilities: tuple[Path, ...] = ()) -> tuple[Target, ...]:
    ctx.typed(raw, (list,), where, "a list of tables like { os = \"macOS\", min_os = \"14\", chip = \"M1\" }")
    if not raw:
        raise ctx.fail(where, "empty; give at least one target")
    out = []
    for j, t in enumerate(raw):
        w = f"{where}[{j}]"
        t = ctx.keys(t, _TARGET_KEYS, w)
        if "os" not in t:
            raise ctx.fail(w, f"missing key 'os'; allowed: {', '.join(PLATFORMS)}")
        os_raw = t["os"]
        if not isinstance(os_raw, str) or os_raw.lower() not in PLATFORMS:
            raise ctx.fail(f"{w}.os", f"{_show(os_raw)} is not allowed; allowed: "
                                      + ", ".join(PLATFORMS.values()))
        if os_raw not in ("macOS", "iOS", "macos", "ios"):
            raise ctx.fail(f"{w}.os", f"{os_raw!r} is not allowed; allowed: macOS, iOS")
        platform = os_raw.lower()
        os_name = PLATFORMS[platform]
        min_os = t.get("min_os")
        if min_os is not None:
            min_os = _check_min_os(ctx, min_os, platform, f"{w}.min_os")
        chip = t.get("chip")
        if chip is not None:
            ctx.typed(chip, (str,), f"{w}.chip", "a chip name such as \"M1\" or \"A17 Pro\"")
            chip = _check_chip(ctx, chip, platform, os_name, f"{w}.chip", capabilities)
        out.append(Target(platform, chip=chip, min_os=min_os))
    labels = [t.label for t in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ctx.fail(where, f"target {dupes[0]} listed twice; each target at most once")
    return tuple(out)


def _check_min_os(ctx: _Ctx, min_os: Any, platform: str, where: str) -> str:
    """The version as written (``"14"``, ``"14.4"``; a ``"macOS14"`` spelling is accepted too)."""
    if isinstance(min_os, (int, float)) and not isinstance(min_os, bool):
        min_os = str(min_os)
    ctx.typed(min_os, (str,), where, "a version such as \"14\"")
    try:
        return parse_os(min_os, platform, what="min_os", convertible=True).version
    except InputError as e:
        raise ctx.fail(where, e.one_line()) from None


def _check_chip(ctx: _Ctx, chip: str, platform: str, os_name: str, where: str,
                capabilities: tuple[Path, ...] = ()) -> str:
    """The chip's canonical name; refuses unknown chips and chips that never run ``platform``."""
    from bitnet_coreml.check.capabilities import default_database, load_capabilities

    try:
        db = load_capabilities(*map(str, capabilities)) if capabilities else default_database()
        row = db.chip(chip)
    except InputError as e:  # in a pipeline file the database is extended with the model's `capabilities` key
        raise ctx.fail(where, e.one_line().replace("--capabilities FILE", 'capabilities = ["FILE.toml"]')) from None
    if platform not in row.platforms:
        runs = ", ".join(PLATFORMS[p] for p in row.platforms if p in PLATFORMS)
        raise ctx.fail(where, f"impossible target: {row.name} does not run {os_name} (it runs {runs});"
                              f" allowed chips for {os_name}: "
                              + ", ".join(c.name for c in db.chips.values() if platform in c.platforms))
    return row.name


def _verify(ctx: _Ctx, raw: Any, where: str) -> VerifySpec:
    ctx.keys(raw, _VERIFY_KEYS, where)
    kw: dict[str, Any] = {}
    if "enabled" in raw:
        kw["enabled"] = ctx.typed(raw["enabled"], (bool,), f"{where}.enabled", "true or false")
    if "inputs" in raw:
        kw["inputs"] = ctx.path_of(raw["inputs"], f"{where}.inputs")
        if kw["inputs"].suffix != ".npz":
            raise ctx.fail(f"{where}.inputs", f"'{raw['inputs']}' is not allowed; allowed: an .npz of named inputs")
    for key, lo, hi in (("min_cosine", -1.0, 1.0), ("min_top1", 0.0, 1.0), ("min_top5", 0.0, 1.0),
                        ("max_rel_l2", 0.0, float("inf"))):
        if key in raw:
            v = ctx.typed(raw[key], (int, float), f"{where}.{key}", "a number")
            if not lo <= v <= hi:
                raise ctx.fail(f"{where}.{key}", f"{v!r} is out of range; allowed: {lo} to {hi}")
            kw[key] = float(v)
    return VerifySpec(**kw)


def _check_output(ctx: _Ctx, output: str, where: str, *, folder: bool = False) -> None:
    try:
        parsed = [(f, spec) for _, f, spec, _ in string.Formatter().parse(output) if f is not None]
    except ValueError as e:
        raise ctx.fail(where, f"{output!r} is not a valid name template ({e})") from e
    for f, spec in parsed:
        if spec:  # a width or fill ('{name:>4000000000}') could ask for gigabytes: plain fields only
            raise ctx.fail(where, f"placeholder '{{{f}:{spec}}}' has a format spec; only plain placeholders "
                                  f"such as '{{{f}}}' are allowed")
    for f, _ in parsed:
        if f not in OUTPUT_FIELDS:
            raise ctx.fail(where, f"unknown placeholder '{{{f}}}'; allowed: {', '.join('{' + x + '}' for x in OUTPUT_FIELDS)}")
    if folder:  # a chunked model folder (chunks = ...): a plain name
        if output.endswith(".mlpackage") or "/" in output or "\\" in output or output.startswith("."):
            raise ctx.fail(where, f"{output!r} is not allowed with chunks; allowed: a folder name without "
                                  ".mlpackage (no paths)")
        return
    if not output.endswith(".mlpackage") or "/" in output or "\\" in output:
        raise ctx.fail(where, f"{output!r} is not allowed; allowed: a file name ending in .mlpackage (no folders)")


def _check_unique(ctx: _Ctx, models: tuple[ModelEntry, ...]) -> None:
    names: set[str] = set()
    outputs: dict[str, str] = {}
    for m in models:
        if m.name in names:
            raise ctx.fail(f"model '{m.name}'", "name used twice; model names must be unique")
        names.add(m.name)
        for t in m.targets:
            out = m.output_name(t)
            if out in outputs:
                raise ctx.fail(f"model '{m.name}'.output", f"'{out}' is also the output of {outputs[out]};"
                               " add {target} or {name} to the template")
            outputs[out] = f"model '{m.name}' target {t.label}"
