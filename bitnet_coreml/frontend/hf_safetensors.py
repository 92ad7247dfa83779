"""The tensors of a checkpoint folder: ``*.safetensors`` files (single or sharded with an index).

Every file is validated once with the safetensors library (``safe_open`` checks the header: a
truncated file or a header that does not cover the data is refused before any tensor is read).
Only headers are consulted at import time: names, dtypes, shapes and byte ranges. Tensor data is a
read-only ``np.memmap`` view of the file, taken when a lazy tensor is materialised: no copy is made,
so the pages are file-backed and the kernel can drop them again (a 656 MB bf16 embedding costs
no anonymous memory until it is converted).

Shard file names come from ``model.safetensors.index.json``; they must be plain names of files in
the folder (an index cannot make us read outside the checkpoint, the same rule as ONNX external data).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
from safetensors import SafetensorError, safe_open

from bitnet_coreml._files import inside, load_json, parse_json, regular_file
from bitnet_coreml.errors import ModelLoadError

log = logging.getLogger(__name__)

# safetensors dtype codes -> (onnx-ir dtype, is floating point)
ST_DTYPES: dict[str, ir.DataType] = {
    "BOOL": ir.DataType.BOOL, "U8": ir.DataType.UINT8, "I8": ir.DataType.INT8,
    "I16": ir.DataType.INT16, "U16": ir.DataType.UINT16, "I32": ir.DataType.INT32,
    "U32": ir.DataType.UINT32, "I64": ir.DataType.INT64, "U64": ir.DataType.UINT64,
    "F16": ir.DataType.FLOAT16, "BF16": ir.DataType.BFLOAT16, "F32": ir.DataType.FLOAT,
    "F64": ir.DataType.DOUBLE,
}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    size = regular_file(path, "safetensors file", error=ModelLoadError).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ModelLoadError(f"{path}: header length {n} is out of range for a {size}-byte file; "
                                 "not a safetensors file (or truncated)")
        header = parse_json(f.read(n), f"{path}: header", error=ModelLoadError)
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: header is not a JSON object")
    return header, 8 + n
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor (no data read)."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16", "U8"
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset of the data in the file
    end: int = 0

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def _safe_shard_name(folder: Path, index_path: Path, name: object) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ModelLoadError(f"{index_path}: weight_map names shard {name!r}; expected a plain file name in the "
                             "checkpoint folder")
    target = inside(folder, folder / name, f"shard {name!r} listed in {index_path.name}", error=ModelLoadError)
    if not target.is_file():
        raise ModelLoadError(f"{index_path}: shard {name!r} listed in weight_map is missing from {folder}")
    return folder / name


class CheckpointTensors:
    """Name -> tensor lookup over every safetensors file of a checkpoint folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._infos: dict[str, TensorInfo] = {}
        files, expected = self._discover()
        for f in files:
            self._open(f)
        for name, f in expected.items():
            info = self._infos.get(name)
            if info is None or info.file != f:
                where = "no shard" if info is None else f"{info.file.name}"
                raise ModelLoadError(f"{f}: tensor {name!r} is listed for this shard in the index but is in {where}; "
                                     "the index and the shards disagree (incomplete download?)")
        log.debug("checkpoint %s: %d tensors in %d file(s)", self.folder, len(self._infos), len(files))

    def _discover(self) -> tuple[list[Path], dict[str, Path]]:
        indexes = sorted(self.folder.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) > 1:
            raise ModelLoadError(f"{self.folder}: several safetensors index files ({', '.join(p.name for p in indexes)}); "
                                 "expected at most one")
        if indexes:
            ip = indexes[0]
            inside(self.folder, ip, "safetensors index", error=ModelLoadError)
            raw = load_json(ip, "safetensors index", error=ModelLoadError)
            wm = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise ModelLoadError(f"{ip}: no weight_map object; expected {{tensor name: shard file}}")
            expected = {str(k): _safe_shard_name(self.folder, ip, v) for k, v in wm.items()}
            files = sorted(set(expected.values()))
            return files, expected
        files = sorted(p for p in self.folder.glob("*.safetensors") if p.is_file())
        if not files:
            other = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (found {', '.join(other)}: pickle checkpoints are not read, re-save with safetensors)" if other else ""
            raise ModelLoadError(f"{self.folder}: no *.safetensors files{hint}")
        return files, {}

    def _open(self, path: Path) -> None:
        inside(self.folder, path, "safetensors file", error=ModelLoadError)
        regular_file(path, "safetensors file", error=ModelLoadError)
        try:
            with safe_open(str(path), framework="numpy") as h:
                listed = set(h.keys())
        except SafetensorError as e:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({' '.join(str(e).split())}); "
                                 "truncated or corrupt download?") from e
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read ({e})") from e
        header, base = _read_header(path)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
                start, stop = (int(o) for o in meta["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ModelLoadError(f"{path}: header entry {name!r} is malformed ({err})") from err
            info = TensorInfo(name, path, dtype, shape, base + start, base + stop)
            if info.dtype not in ST_DTYPES:
                raise ModelLoadError(f"{path}: tensor {info.name!r} has dtype {info.dtype}; supported: "
                                     f"{', '.join(ST_DTYPES)}")
            prev = self._infos.get(info.name)
            if prev is not None:
                raise ModelLoadError(f"{path}: tensor {info.name!r} is also in {prev.file.name}; names must be unique")
            self._infos[info.name] = info
        if listed != {n for n in header if n != "__metadata__"}:
            raise ModelLoadError(f"{path}: header and safetensors library disagree on the tensor list; corrupt file?")

    # --- lookup -----------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo | None:
        return self._infos.get(name)

    def require(self, name: str, *, shapes: list[tuple[int, ...]], dtypes: tuple[str, ...] | None = None,
                what: str = "") -> TensorInfo:
        """The header of ``name``, checked against the allowed shapes and dtypes (nothing is read)."""
        info = self._infos.get(name)
        label = f"{what} " if what else ""
        if info is None:
            raise ModelLoadError(f"{self.folder}: missing tensor {name!r} ({label}expected shape "
                                 f"{' or '.join(str(list(s)) for s in shapes)})")
        if info.shape not in shapes:
            raise ModelLoadError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}; expected "
                                 f"{' or '.join(str(list(s)) for s in shapes)} from config.json")
        if dtypes is not None and info.dtype not in dtypes:
            raise ModelLoadError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; expected {' or '.join(dtypes)}")
        return info

    # --- data -------------------------------------------------------------------------------------

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (or of rows ``[r0, r1)``) in its stored dtype.

        Each call maps just that range and the mapping goes when the array does, so pages a consumer
        has finished with stop counting against the process (bf16 comes as ``ml_dtypes.bfloat16``).
        """
        info = self._infos[name]
        dt = _NP_DTYPES[info.dtype]
        if info.end - info.start != info.numel * dt.itemsize:
            raise ModelLoadError(f"{info.file}: tensor {name!r} spans {info.end - info.start} bytes but "
                                 f"{info.describe()} needs {info.numel * dt.itemsize}")
        shape, start = info.shape, info.start
        if rows is not None:
            r0, r1 = rows
            row_bytes = (info.numel // max(1, shape[0])) * dt.itemsize if shape else 0
            start += r0 * row_bytes
            shape = (r1 - r0, *shape[1:])
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=dt)
        mm = np.memmap(info.file, dtype=dt, mode="r", offset=start, shape=shape)
        return mm.view(np.ndarray)

    def read_as(self, name: str, dtype: np.dtype[Any] | type) -> np.ndarray:
        """The tensor converted to ``dtype`` (e.g. float32); bf16 widens exactly."""
        a = self.read(name)
        return a if a.dtype == np.dtype(dtype) else a.astype(dtype)
