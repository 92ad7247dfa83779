"""What the runtime needs to know about a package before running it: input specs, outputs, weight size.

Reads the package description with :func:`bitnet_coreml.package.reader.read_package_spec` (every OS,
never writes into the package) and validates
prediction inputs against it, so bad input fails once, clearly, before any unit is tried.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.executor._types import scalar_for_one
from bitnet_coreml.vocab import InputSpec

__all__ = ["InputSpec", "PackageInfo", "PredictionInputError", "read_package", "select_inputs", "split_batch",
           "validate_inputs", "zeros_for"]


class PredictionInputError(InputError):
    """The prediction inputs do not match the package's input description."""


# Core ML multi-array data types (ArrayFeatureType.ArrayDataType) -> numpy.
_ARRAY_DTYPES = {65552: np.float16, 65568: np.float32, 65600: np.float64, 131104: np.int32, 131080: np.int8}


@dataclasses.dataclass(frozen=True)
class PackageInfo:
    """The package's path, inputs, outputs and weight bytes."""

    path: Path
    inputs: dict[str, InputSpec]
    output_names: tuple[str, ...]
    weight_bytes: int
    spec_version: int
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def read_package(path: str | os.PathLike[str]) -> PackageInfo:
    """Read a ``.mlpackage``'s description; raises :class:`ModelLoadError` if missing or corrupt."""
    from bitnet_coreml.package.reader import read_package_spec

    p = Path(path)
    spec = read_package_spec(p).spec  # read-only and contained (MLModel(path) rewrites Manifest.json)
    inputs: dict[str, InputSpec] = {}
    for feat in spec.description.input:
        if feat.type.WhichOneof("Type") != "multiArrayType":
            raise ModelLoadError(f"package {p}: input {feat.name!r} is a {feat.type.WhichOneof('Type')}; "
                                 "only multi-array inputs are supported")
        arr = feat.type.multiArrayType
        dtype = _ARRAY_DTYPES.get(int(arr.dataType))
        if dtype is None:
            raise ModelLoadError(f"package {p}: input {feat.name!r} has unsupported data type {arr.dataType}")
        enumerated = tuple(tuple(int(d) for d in s.shape) for s in arr.enumeratedShapes.shapes)
        ranges = tuple((int(r.lowerBound), int(r.upperBound)) for r in arr.shapeRange.sizeRanges)
        inputs[feat.name] = InputSpec(tuple(int(d) for d in arr.shape), np.dtype(dtype), enumerated, ranges, feat.name)
    outputs = tuple(o.name for o in spec.description.output)
    weights = p / "Data" / "com.apple.CoreML" / "weights"
    weight_bytes = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0
    metadata = {str(k): str(v) for k, v in spec.description.metadata.userDefined.items()}
    return PackageInfo(p, inputs, outputs, weight_bytes, int(spec.specificationVersion), metadata)


def select_inputs(info: PackageInfo, arrays: Mapping[str, Any], *, strict: bool = False,
                  source: str = "inputs") -> tuple[dict[str, Any], list[str]]:
    """The arrays the package takes, and a note naming the ones ignored.

    A file often carries more than the model's inputs (reference logits, an evaluation set): those are
    left out with a one-line note, or refused when ``strict``. A missing input is always an error.
    """
    given, wanted = set(arrays), set(info.inputs)
    missing, extra = sorted(wanted - given), sorted(given - wanted)
    takes = f"{info.path.name} takes {', '.join(sorted(wanted))}"
    if missing:
        raise PredictionInputError(f"{source}: missing {', '.join(missing)}; {takes}"
                                   + (f" (the file holds {', '.join(sorted(given))})" if given else ""))
    if extra and strict:
        raise PredictionInputError(f"{source}: unexpected {', '.join(extra)}; {takes} (--strict refuses other arrays)")
    notes = [f"{source}: ignored {', '.join(extra)} ({takes})"] if extra else []
    return {k: arrays[k] for k in sorted(wanted)}, notes


def split_batch(info: PackageInfo, inputs: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """One prediction's inputs per row, where the arrays carry a batch dimension the package lacks.

    For a package whose inputs have a leading dimension of 1 (``[1, 16]``): an array of shape ``[16]``
    gets that dimension added (a row of an ``(N, 16)`` token matrix), and arrays of shape ``[N, 16]``
    (every input with the same ``N``) are sliced into ``N`` predictions. Anything else is returned
    unchanged for :func:`validate_inputs` to judge.
    """
    arrays = {k: np.asarray(v) for k, v in inputs.items()}
    specs = {k: info.inputs[k] for k in arrays if k in info.inputs}
    if not specs or any(s.enumerated or s.ranges or not s.shape or s.shape[0] != 1 for s in specs.values()):
        return [arrays]
    if all(tuple(arrays[k].shape) == s.shape[1:] for k, s in specs.items()):
        return [{k: (v[None] if k in specs else v) for k, v in arrays.items()}]
    rows = {arrays[k].shape[0] for k in specs if arrays[k].ndim == len(specs[k].shape)}
    if len(rows) == 1 and all(arrays[k].ndim == len(s.shape) and tuple(arrays[k].shape[1:]) == s.shape[1:]
                              for k, s in specs.items()):
        n = rows.pop()
        if n > 1:
            return [{k: (v[i:i + 1] if k in specs else v) for k, v in arrays.items()} for i in range(n)]
    return [arrays]


def validate_inputs(info: PackageInfo, inputs: Mapping[str, Any], *, source: str = "inputs") -> dict[str, np.ndarray]:
    """Check names, shapes, dtypes and finiteness; return arrays cast to the declared dtypes.

    Float inputs may come as any float dtype (cast to the declared one; .npz files are often
    float64); integer inputs as any integer dtype whose values fit. Crossing kinds (int for float,
    float for int, bool, object) is an error, as is a NaN or infinity.
    """
    given, wanted = set(inputs), set(info.inputs)
    if given != wanted:
        missing, extra = sorted(wanted - given), sorted(given - wanted)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise PredictionInputError(f"{source}: {'; '.join(parts)}; {info.path.name} takes exactly: "
                                   f"{', '.join(sorted(wanted))}")
    out: dict[str, np.ndarray] = {}
    for name, spec in info.inputs.items():
        arr = np.asarray(inputs[name])
        if scalar_for_one(arr.shape, spec.shape) and not spec.enumerated and not spec.ranges:
            arr = arr.reshape(1)  # a scalar of the source graph, declared [1] by the converter
        if not spec.shape_ok(tuple(arr.shape)):
            raise PredictionInputError(f"{source}: input {name!r} has shape {list(arr.shape)}; "
                                       f"{info.path.name} expects {spec.allowed_shapes()}")
        want_kind = spec.dtype.kind
        if want_kind == "f":
            if arr.dtype.kind != "f":
                raise PredictionInputError(f"{source}: input {name!r} has dtype {arr.dtype}; expected a float dtype "
                                           f"({spec.dtype})")
            if not np.isfinite(arr).all():
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise PredictionInputError(f"{source}: input {name!r} contains {bad} NaN/infinite value(s); "
                                           "inputs must be finite")
            if np.abs(arr).max(initial=0.0) > np.finfo(spec.dtype).max:
                raise PredictionInputError(f"{source}: input {name!r} has values beyond the {spec.dtype} range")
        elif want_kind in "iu":
            if arr.dtype.kind not in "iu":
                raise PredictionInputError(f"{source}: input {name!r} has dtype {arr.dtype}; expected an integer dtype "
                                           f"({spec.dtype})")
            lim = np.iinfo(spec.dtype)
            if arr.size and (arr.min() < lim.min or arr.max() > lim.max):
                raise PredictionInputError(f"{source}: input {name!r} has values outside {spec.dtype} "
                                           f"[{lim.min}, {lim.max}]")
        out[name] = np.ascontiguousarray(arr, dtype=spec.dtype)
    return out


def zeros_for(info: PackageInfo) -> dict[str, np.ndarray]:
    """All-zero inputs of the default shapes (what a probe runs)."""
    return {n: np.zeros(tuple(1 if d is None else int(d) for d in s.shape), dtype=s.dtype) for n, s in info.inputs.items()}
