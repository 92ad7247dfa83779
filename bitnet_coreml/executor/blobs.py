"""Read a package's MIL program without its large weights, and each weight from ``weight.bin`` when compiled.

coremltools' proto loader (``milproto.load``) reads every weight of the package into numpy while it
builds the program, sub-byte indices unpacked to one byte per element: for a BitNet model that is 4x
the 2-bit weights' bytes, and the program keeps all of it while the executor makes its own compute
form. Here the loader gets, for every weight of at least :data:`MIN_LAZY_BYTES`, a *stand-in*: a
zero-strided (memoryless) array of the declared shape and dtype. The compiler then asks
:meth:`LazyBlobs.materialize` for the real value of each stand-in it meets, which reads that one
weight's bytes from the weight file (``package.reader.read_blob``, header checked) in the form it
keeps: fp16 / fp32 / integer arrays as stored, sub-byte indices still packed (:class:`PackedBits`)
for a LUT decompression to read directly. Peak memory at load is then one weight at a time.

The stand-ins are only valid while nothing computes with them during the load. :func:`load_lazily`
checks that afterwards (every memoryless array in the program is a registered stand-in, and no op
reading one has a value computed at load) and returns None otherwise, so the caller loads the plain
way.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.package.reader import read_blob

__all__ = ["LazyBlobs", "PackedBits", "load_lazily", "LOAD_LOCK", "MIN_LAZY_BYTES"]

# Weights smaller than this are read by coremltools as usual.
MIN_LAZY_BYTES = 1 << 16
# coremltools' loader is patched while a lazy load runs: every program load in the process holds this.
LOAD_LOCK = threading.Lock()


class PackedBits:
    """Sub-byte integers (``nbits`` each) packed LSB-first into bytes, as stored in a Core ML weight file."""

    __slots__ = ("packed", "nbits", "shape", "dtype", "signed")

    def __init__(self, packed: np.ndarray, nbits: int, shape: tuple[int, ...], dtype: np.dtype, signed: bool) -> None:
        self.packed, self.nbits, self.shape, self.dtype, self.signed = packed, nbits, shape, dtype, signed

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes)

    def unpack(self) -> np.ndarray:
        """One element per array entry, as coremltools' own loader makes it."""
        from coremltools.optimize import _utils as optimize_utils

        count = int(np.prod(self.shape, dtype=np.int64))
        return optimize_utils.restore_elements_from_packed_bits(
            self.packed, self.nbits, count, self.signed).reshape(self.shape).astype(self.dtype)


class LazyBlobs:
    """The stand-ins handed to coremltools' loader and where each one's bytes are."""

    def __init__(self, weights_dir: Path) -> None:
        self.weights_dir = Path(weights_dir)
        # id(stand-in) -> (stand-in, blob file name as in the spec, record offset, MIL dtype, shape)
        self._entries: dict[int, tuple[np.ndarray, str, int, Any, tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def stand_in(self, value_spec: Any) -> np.ndarray | None:
        """A memoryless stand-in for the blob-file tensor value ``value_spec``, or None to load it as usual."""
        if value_spec.WhichOneof("value") != "blobFileValue" or value_spec.type.WhichOneof("type") != "tensorType":
            return None
        from coremltools.converters.mil.frontend.milproto.helper import proto_to_types
        from coremltools.converters.mil.mil import types

        vt = proto_to_types(value_spec.type)
        if not types.is_tensor(vt):
            return None
        dtype, shape = vt.get_primitive(), tuple(vt.get_shape())
        if not all(isinstance(d, (int, np.integer)) for d in shape):
            return None
        bits = dtype.get_bitwidth() if hasattr(dtype, "get_bitwidth") else 0
        if not bits or int(np.prod(shape, dtype=np.int64)) * bits < 8 * MIN_LAZY_BYTES:
            return None
        stand_in = np.broadcast_to(np.zeros((), dtype=types.nptype_from_builtin(dtype)), shape)
        blob = value_spec.blobFileValue
        self._entries[id(stand_in)] = (stand_in, str(blob.fileName), int(blob.offset), dtype, tuple(int(d) for d in shape))
        return stand_in

    def _entry(self, value: Any) -> tuple[np.ndarray, str, int, Any, tuple[int, ...]] | None:
        e = self._entries.get(id(value))
        return e if e is not None and e[0] is value else None

    def is_lazy(self, value: Any) -> bool:
        return self._entry(value) is not None

    def key(self, value: Any) -> tuple[Any, ...] | None:
        """``("blob", file name, offset)`` of a stand-in (the key ``executor.shared.blob_keys`` uses)."""
        e = self._entry(value)
        return None if e is None else ("blob", e[1], e[2])

    def materialize(self, value: Any, *, packed: bool = False) -> np.ndarray | PackedBits:
        """The real value of stand-in ``value``; sub-byte data stays packed when ``packed``."""
        from coremltools.converters.mil.mil import types

        e = self._entry(value)
        if e is None:
            raise KeyError("not a stand-in of this package")
        stand_in, name, offset, dtype, shape = e
        raw = read_blob(self.weights_dir / name.split("/")[-1], offset)
        if types.is_sub_byte(dtype):
            bits = PackedBits(raw, dtype.get_bitwidth(), shape, stand_in.dtype, not dtype.is_unsigned())
            return bits if packed else bits.unpack()
        count = int(np.prod(shape, dtype=np.int64))
        arr = raw.view(stand_in.dtype)
        if arr.size < count:
            from bitnet_coreml.errors import ModelLoadError

            raise ModelLoadError(f"{self.weights_dir}: weight at offset {offset} holds {arr.size} values, "
                                 f"its type {list(shape)} needs {count} (corrupt package)")
        return arr[:count].reshape(shape)

    def consistent(self, program: Any) -> bool:
        """True when the loaded ``program`` used no stand-in's values (see the module docstring)."""
        for func in program.functions.values():
            stack = [func]
            while stack:
                block = stack.pop()
                for op in block.operations:
                    stack.extend(op.blocks)
                    if op.op_type == "const":
                        v = op.outputs[0].val
                        if isinstance(v, np.ndarray) and v.size > 1 and not any(v.strides) and not self.is_lazy(v):
                            return False  # a copy of a stand-in: its zeros would be taken for weights
                        continue
                    reads = any(self.is_lazy(getattr(var, "val", None))
                                for inp in op.inputs.values() for var in (inp if isinstance(inp, (list, tuple)) else (inp,)))
                    if reads and any(getattr(o, "val", None) is not None for o in op.outputs):
                        return False  # a value computed at load from a stand-in's zeros
        return True


def load_lazily(spec: Any, weights_dir: Path) -> tuple[Any, LazyBlobs] | None:
    """``(program, stand-ins)`` of an ML Program ``spec``, or None when a lazy load is not possible."""
    from coremltools.converters.mil.frontend.milproto import load as milproto_load

    plain = getattr(milproto_load, "_load_value", None)
    if plain is None:  # a coremltools without the hook: load the usual way
        return None
    blobs = LazyBlobs(weights_dir)

    def lazy(context: Any, value_spec: Any) -> Any:
        held = blobs.stand_in(value_spec)
        return held if held is not None else plain(context, value_spec)

    with LOAD_LOCK:
        milproto_load._load_value = lazy
        try:
            prog = milproto_load.load(model_spec=spec, specification_version=spec.specificationVersion,
                                      file_weights_dir=str(weights_dir))
        finally:
            milproto_load._load_value = plain
    if not blobs.consistent(prog):
        return None
    return prog, blobs
