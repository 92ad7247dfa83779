"""Facts about stateful LLM packages (``convert --stateful``), in one place.

A stateful package is an ML Program (iOS18 / macOS15) with two functions sharing one copy of every
weight and one KV cache held as Core ML state::

    prefill: input_ids int32 [1, P], position int32 [1] -> logits [1, P, V] (or [1, 1, V] with --prefill-logits last)
    decode (the default function): input_ids int32 [1, 1], position int32 [1] -> logits [1, 1, V]

``position`` is the absolute position of the call's first token; a call writes K/V of its tokens into
cache slots ``position .. position+S-1`` and attends to slots ``0 .. position+i``. States are one pair
per decoder layer, ``k_cache_<i>`` / ``v_cache_<i>``, fp16 ``[1, kv_heads, context, head_dim]``
(fp32 packages add ``*_lo`` states holding what fp16 rounding lost). Per-layer states keep each
update to its own layer's cache (one shared state would be rewritten whole by every layer) and let a
model split into pieces give each piece its own layers' states.

This module reads and checks what :func:`bitnet_coreml.convert.convert` records in the metadata,
describes a package's functions for ``inspect`` / ``info``, and validates positions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitnet_coreml.errors import InputError

__all__ = [
    "FUNCTIONS", "DEFAULT_FUNCTION", "CONTEXT_MULTIPLE", "StatefulInfo", "validate_sizes", "round_context",
    "kv_cache_bytes", "stateful_info", "check_position", "function_specs", "metadata_entries",
]

PREFILL, DECODE = "prefill", "decode"
FUNCTIONS = (PREFILL, DECODE)
DEFAULT_FUNCTION = DECODE
CONTEXT_MULTIPLE = 32  # a state dimension not a multiple of 32 fails on the ANE (coremltools issue 2631)
PREFILL_LOGITS = ("all", "last")
META = "bitnet_coreml.stateful"  # package metadata key: JSON of StatefulInfo.to_dict()


@dataclass(frozen=True)
class StatefulInfo:
    """What a stateful package records about itself (metadata key ``bitnet_coreml.stateful``)."""

    context: int
    prefill: int
    prefill_logits: str
    states: dict[str, list[int]] = field(default_factory=dict)  # name -> shape (fp16)
    functions: tuple[str, ...] = FUNCTIONS
    default_function: str = DEFAULT_FUNCTION
    cache: str = "fp16"  # "fp16", or "fp16x2" (fp32 packages: hi + lo states)

    def tokens(self, function: str) -> int:
        """Tokens per call of ``function``: P for prefill, 1 for decode."""
        if function not in self.functions:
            raise InputError(f"function {function!r} is not in the package; functions: {', '.join(self.functions)}")
        return self.prefill if function == PREFILL else 1

    @property
    def state_bytes(self) -> int:
        total = 0
        for shape in self.states.values():
            n = 2
            for d in shape:
                n *= int(d)
            total += n
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "prefill": self.prefill, "prefill_logits": self.prefill_logits,
                "states": {k: list(v) for k, v in sorted(self.states.items())}, "functions": list(self.functions),
                "default_function": self.default_function, "cache": self.cache, "state_dtype": "float16",
                "state_bytes": self.state_bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatefulInfo:
        return cls(context=int(d["context"]), prefill=int(d["prefill"]), prefill_logits=str(d["prefill_logits"]),
                   states={k: [int(x) for x in v] for k, v in d.get("states", {}).items()},
                   functions=tuple(d.get("functions", FUNCTIONS)),
                   default_function=str(d.get("default_function", DEFAULT_FUNCTION)), cache=str(d.get("cache", "fp16")))


def validate_sizes(context: int, prefill: int, prefill_logits: str) -> None:
    """Raise InputError (exit 2) for sizes a stateful package cannot have."""
    for flag, v in (("--context", context), ("--prefill", prefill)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{flag} {v!r}: expected a positive integer")
    if prefill > context:
        raise InputError(f"--prefill {prefill} is larger than --context {context}; a prefill call writes {prefill} "
                         "cache slots")
    if prefill_logits not in PREFILL_LOGITS:
        raise InputError(f"--prefill-logits {prefill_logits!r}; allowed: {', '.join(PREFILL_LOGITS)}")


def round_context(context: int, exact: bool) -> tuple[int, str | None]:
    """``context`` rounded up to a multiple of 32 unless ``exact``; returns (context, note or None)."""
    if context % CONTEXT_MULTIPLE == 0:
        return context, None
    up = -(-context // CONTEXT_MULTIPLE) * CONTEXT_MULTIPLE
    if exact:
        return context, (f"--context {context} is not a multiple of {CONTEXT_MULTIPLE}: kept as asked (--exact-context); "
                         "the ANE rejects such states (coremltools issue 2631), Core ML runs the model elsewhere")
    return up, (f"--context {context} rounded up to {up}: a state dimension that is not a multiple of "
                f"{CONTEXT_MULTIPLE} fails on the ANE (coremltools issue 2631); --exact-context keeps {context}")


def kv_cache_bytes(layers: int, kv_heads: int, context: int, head_dim: int, *, cache: str = "fp16") -> int:
    """Bytes of the KV cache: 2 (K and V) x layers x kv_heads x context x head_dim x 2 (fp16), x2 for fp16x2."""
    return 2 * layers * kv_heads * context * head_dim * 2 * (2 if cache == "fp16x2" else 1)


def metadata_entries(info: StatefulInfo) -> dict[str, str]:
    """The package metadata that records ``info``."""
    return {META: json.dumps(info.to_dict(), sort_keys=True)}


def stateful_info(source: str | os.PathLike[str] | Any) -> StatefulInfo | None:
    """The :class:`StatefulInfo` of a package (path or loaded ``MLModel``) or of a chunked model folder
    (``package/chunked.py``), or None for a stateless one."""
    if isinstance(source, (str, os.PathLike)):
        from bitnet_coreml.package.chunked import is_chunked, open_chunked

        if is_chunked(source):
            whole = open_chunked(source).stateful
            return StatefulInfo.from_dict(whole) if whole else None
    meta = _metadata(source)
    raw = meta.get(META)
    if not raw:
        return None
    try:
        return StatefulInfo.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{source}: metadata {META} is not valid: {e}") from e


def _open_spec(path: str | os.PathLike[str]) -> Any:
    """The spec of the package at ``path``, read-only (InputError: not a package; ModelLoadError: unreadable)."""
    from bitnet_coreml.package.reader import read_package_spec

    p = Path(path)
    if not (p / "Manifest.json").is_file():
        raise InputError(f"{p}: not an .mlpackage (no Manifest.json)")
    return read_package_spec(p).spec  # (MLModel(path) would rewrite Manifest.json)


def _metadata(source: Any) -> dict[str, str]:
    if isinstance(source, (str, os.PathLike)):
        source = _open_spec(source)
    spec = source.get_spec() if hasattr(source, "get_spec") else source
    return {str(k): str(v) for k, v in spec.description.metadata.userDefined.items()}


def check_position(info: StatefulInfo, function: str, position: int) -> None:
    """Refuse (InputError, exit 2) a call whose tokens would not fit the cache: position + S <= context."""
    s = info.tokens(function)
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise InputError(f"position {position!r}: expected an integer >= 0")
    if position + s > info.context:
        last = info.context - s
        raise InputError(f"position {position} with {function} ({s} token{'s' if s > 1 else ''}) needs cache slots "
                         f"{position}..{position + s - 1}, but the package's context is {info.context} "
                         f"(slots 0..{info.context - 1}); allowed positions for {function}: 0..{last}")


def function_specs(spec: Any) -> list[dict[str, Any]]:
    """Per function of a Core ML spec: name, inputs, outputs and states with shapes, dtypes and bytes.

    Works for one-function and multifunction specs (``description.functions``); what ``inspect``
    and ``info`` print for a package.
    """
    desc = spec.description
    default = desc.defaultFunctionName or (desc.functions[0].name if len(desc.functions) else "main")
    fns = list(desc.functions) if len(desc.functions) else [desc]
    out = []
    for f in fns:
        name = getattr(f, "name", "") or "main"
        out.append({"name": name, "default": name == default,
                    "inputs": [_feature(x) for x in f.input], "outputs": [_feature(x) for x in f.output],
                    "states": [_feature(x) for x in f.state]})
    return out


def _feature(fd: Any) -> dict[str, Any]:
    import numpy as np

    from bitnet_coreml._quiet import coremltools

    coremltools()  # coremltools.proto runs coremltools/__init__: its off-macOS noise filtered
    from coremltools.proto import FeatureTypes_pb2

    t = fd.type
    kind = t.WhichOneof("Type")
    arr = t.stateType.arrayType if kind == "stateType" else (t.multiArrayType if kind == "multiArrayType" else None)
    if arr is None:
        return {"name": fd.name, "type": kind}
    shape = [int(d) for d in arr.shape]
    name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(int(arr.dataType))  # FLOAT16, INT32, ...
    dtype = np.dtype({"DOUBLE": "float64"}.get(name, name.lower()))
    return {"name": fd.name, "shape": shape, "dtype": dtype.name, "bytes": int(np.prod(shape)) * dtype.itemsize}


def describe_functions(mlmodel: Any, info: StatefulInfo) -> None:
    """Write the feature descriptions of every function of a stateful ``mlmodel`` (in place)."""
    spec = mlmodel._spec  # the multifunction description lives per function; MLModel's helpers see only the top level
    for f in spec.description.functions:
        s = info.tokens(f.name)
        texts = {
            "input_ids": f"token ids, int32 [1, {s}]",
            "position": "int32 [1]: absolute position of the first token (its cache slot); "
                        f"0..{info.context - s}",
            "logits": f"logits of {'the last token' if f.name == PREFILL and info.prefill_logits == 'last' else 'every token'}",
        }
        for feat in list(f.input) + list(f.output):
            if feat.name in texts:
                feat.shortDescription = texts[feat.name]
        for feat in f.state:
            kind = "keys" if feat.name.startswith("k_") else "values"
            lo = " (the part fp16 rounding lost, fp32 packages)" if feat.name.endswith("_lo") else ""
            feat.shortDescription = f"KV cache: {kind} of layer {feat.name.split('_')[2]}{lo}, fp16"


def describe_package(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``inspect PKG.mlpackage`` shows of any package: spec version, functions (default first
    marked) with their inputs, outputs and states (shape, dtype, bytes), weight bytes, state bytes,
    and for a stateful package its :class:`StatefulInfo`. Raises InputError for a non-package."""
    from bitnet_coreml.package.writer import weight_bytes

    p = Path(path)
    spec = _open_spec(p)
    fns = function_specs(spec)
    info = stateful_info(spec)
    states = {s["name"]: s["bytes"] for f in fns for s in f["states"]}
    return {"package": str(p), "spec_version": int(spec.specificationVersion),
            "default_function": next((f["name"] for f in fns if f["default"]), None), "functions": fns,
            "weight_bytes": weight_bytes(p), "state_bytes": sum(states.values()),
            "stateful": info.to_dict() if info is not None else None}
