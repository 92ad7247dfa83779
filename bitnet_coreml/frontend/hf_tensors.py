"""Lazy onnx-ir tensors backed by checkpoint data: float weights and BitLinear ternary codes.

Nothing here is read when the graph is built: each tensor reads its source tensor from the
memory-mapped safetensors file when (and each time) ``numpy()``/``tobytes()`` is called, so a
converter that walks the layers one by one never holds more than one layer's weights.

:class:`TernaryCodes` is the ``W`` input of ``bitnet_coreml::BitLinear`` (int8 ``[N, K]`` in
{-1, 0, 1}) and also exposes its source for consumers that can use it without a dense matrix:

* ``packed_source()``: the checkpoint's uint8 ``[N/4, K]`` as stored (row block ``i`` in bits
  ``2i..2i+1``, value = code + 1), or None when the checkpoint stores unpacked weights;
* ``lut_indices()``: uint8 ``[N, K]`` with values in {0, 1, 2} = code + 1, computed from the packed
  bytes with shifts and masks only. With the lookup table ``[-1, 0, 1, 0]`` (times Alpha) these are
  directly the indices of a 2-bit palette (Core ML ``constexpr_lut_to_dense``), so a 2-bit packer
  never needs the int8 codes;
* ``lut2_bytes()``: those indices already packed four to a byte in Core ML's order, regrouped straight
  from the checkpoint's bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.frontend.hf_safetensors import CheckpointTensors

VALUES_PER_BYTE = 4
WEIGHT_QUANT_EPS = 1e-5  # transformers' WeightQuant: scale = 1 / mean(|W|).clamp(min=1e-5)
_NP_OF_IR = {ir.DataType.FLOAT: np.dtype(np.float32), ir.DataType.FLOAT16: np.dtype(np.float16),
             ir.DataType.INT8: np.dtype(np.int8)}


def unpack_indices(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[R, K]`` packed -> uint8 ``[4R, K]`` 2-bit values (code + 1); row block i is bits 2i..2i+1."""
    rows = packed.shape[0]
    out = np.empty((VALUES_PER_BYTE * rows, *packed.shape[1:]), dtype=np.uint8)
    for i in range(VALUES_PER_BYTE):
        blk = out[i * rows:(i + 1) * rows]
        np.right_shift(packed, 2 * i, out=blk)
        np.bitwise_and(blk, 3, out=blk)
    return out


def pack_indices_2bit(indices: np.ndarray) -> np.ndarray:
    """2-bit values (uint8, any shape) packed four to a byte in row-major order, element ``4j+i`` in bits
    ``2i..2i+1`` of byte ``j`` (Core ML's ``constexpr_lut_to_dense`` layout); zero-padded to whole bytes."""
    flat = indices.reshape(-1)
    pad = (-flat.size) % VALUES_PER_BYTE
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    q = flat.reshape(-1, VALUES_PER_BYTE)
    out = q[:, 0].copy()
    out |= q[:, 1] << 2
    out |= q[:, 2] << 4
    out |= q[:, 3] << 6
    return out


def _chunk_rows(n_rows: int, row_bytes: int, budget: int = 64 << 20) -> int:
    return max(1, min(n_rows, budget // max(1, row_bytes)))


class CheckpointTensor(ir.LazyTensor):
    """A float checkpoint tensor declared as ``dtype`` (float32 by default), converted on demand.

    ``numpy_as(np.float16)`` converts straight from the stored dtype in row chunks, so a consumer
    that wants fp16 (the Core ML weights) never holds a float32 copy of a large embedding.
    """

    def __init__(self, store: CheckpointTensors, source: str, *, dtype: ir.DataType = ir.DataType.FLOAT,
                 name: str | None = None) -> None:
        info = store.info(source)
        assert info is not None, source
        self.store = store
        self.source_name = source
        self.source_dtype = info.dtype
        super().__init__(lambda: ir.tensor(self.numpy_as(_NP_OF_IR[dtype])), dtype=dtype,
                         shape=ir.Shape(info.shape), name=name or source)

    def numpy_as(self, dtype: Any) -> np.ndarray:
        want = np.dtype(dtype)
        shape = tuple(int(d) for d in self.shape.numpy())
        if len(shape) < 2:
            src = self.store.read(self.source_name)
            return src if src.dtype == want else src.astype(want)
        first = self.store.read(self.source_name, rows=(0, 0))
        if first.dtype == want:
            return self.store.read(self.source_name)  # zero-copy view of the file
        # row chunks, each mapped and released in turn: peak = the output + one chunk
        out = np.empty(shape, dtype=want)
        step = _chunk_rows(shape[0], int(np.prod(shape[1:])) * 4)
        for r in range(0, shape[0], step):
            stop = min(shape[0], r + step)
            out[r:stop] = self.store.read(self.source_name, rows=(r, stop)).astype(want)
        return out


class TernaryCodes(ir.LazyTensor):
    """int8 ``[N, K]`` ternary codes of one BitLinear, from the checkpoint on demand.

    ``kind``:

    * ``"packed"``: uint8 ``[N/4, K]`` source, codes = 2-bit value - 1;
    * ``"dense"``: stored weights with values in {-a, 0, a} (offline, unpacked); ``magnitude()`` is a;
    * ``"online"``: float weights ternarised by absmean as transformers' ``WeightQuant`` does
      (``s = 1/max(mean|W|, 1e-5)``, codes = ``clip(round(W*s), -1, 1)``); ``magnitude()`` is ``1/s``
      in float32, the value the dequantised weight carries in a float32 run. A packed source in
      online mode is first unpacked to its codes (transformers unpacks, then re-quantises).
    """

    def __init__(self, store: CheckpointTensors, source: str, kind: str, *, name: str | None = None,
                 out_features: int | None = None) -> None:
        info = store.info(source)
        assert info is not None, source
        if kind not in ("packed", "dense", "online"):
            raise ValueError(f"unknown ternary source kind {kind!r}")
        self.store = store
        self.source_name = source
        self.source_dtype = info.dtype
        self.kind = kind
        self.is_packed = info.dtype == "U8"
        n = info.shape[0] * VALUES_PER_BYTE if self.is_packed else info.shape[0]
        if out_features is not None and out_features != n:
            raise ValueError(f"{source}: {n} output rows, expected {out_features}")
        self._magnitude: float | None = None
        super().__init__(lambda: ir.tensor(self.codes()), dtype=ir.DataType.INT8,
                         shape=ir.Shape([n, info.shape[1]]), name=name or source)

    def _where(self) -> str:
        info = self.store.info(self.source_name)
        return f"{info.file if info else self.store.folder}: tensor {self.source_name!r}"

    # --- sources ----------------------------------------------------------------------------------

    def packed_source(self) -> np.ndarray | None:
        """The stored uint8 ``[N/4, K]`` bytes (row block i in bits 2i..2i+1), or None if not packed."""
        return self.store.read(self.source_name) if self.is_packed else None

    def lut_indices(self) -> np.ndarray:
        """uint8 ``[N, K]`` in {0, 1, 2} = code + 1: 2-bit palette indices for the LUT ``[-1, 0, 1, 0]``."""
        if self.is_packed and self.kind == "packed":
            idx = unpack_indices(self.store.read(self.source_name))
            if np.any(idx == 3):
                raise ModelLoadError(f"{self._where()}: packed weight holds the 2-bit value 3, which is not a "
                                     "ternary code (allowed 0, 1, 2 = -1, 0, +1); corrupt checkpoint?")
            return idx
        c = self.codes()
        return (c + 1).view(np.uint8)

    def lut2_bytes(self) -> np.ndarray:
        """The codes as Core ML ``constexpr_lut_to_dense`` 2-bit indices, ready to store: uint8 ``[N*K/4]``.

        Layout: row-major element order, element ``4j+i`` in bits ``2i..2i+1`` of byte ``j``; index =
        code + 1 for the LUT ``[-1, 0, 1, 0]``. From a packed checkpoint the bytes are regrouped with
        shifts and masks one row block at a time (a quarter of the layer as uint8, never int8 or float).
        """
        n, k = (int(d) for d in self.shape.numpy())
        if not (self.is_packed and self.kind == "packed") or k % VALUES_PER_BYTE:
            return pack_indices_2bit(self.lut_indices())
        packed = self.store.read(self.source_name)
        rows = packed.shape[0]
        out = np.empty((n, k // VALUES_PER_BYTE), dtype=np.uint8)
        field = np.empty_like(packed)
        for i in range(VALUES_PER_BYTE):
            np.right_shift(packed, 2 * i, out=field)
            np.bitwise_and(field, 3, out=field)
            if np.any(field == 3):
                raise ModelLoadError(f"{self._where()}: packed weight holds the 2-bit value 3, which is not a "
                                     "ternary code (allowed 0, 1, 2 = -1, 0, +1); corrupt checkpoint?")
            f4 = field.reshape(rows, k // VALUES_PER_BYTE, VALUES_PER_BYTE)
            blk = out[i * rows:(i + 1) * rows]
            np.copyto(blk, f4[..., 0])
            blk |= f4[..., 1] << 2
            blk |= f4[..., 2] << 4
            blk |= f4[..., 3] << 6
        return out.reshape(-1)

    # --- codes ------------------------------------------------------------------------------------

    def _float_weight(self) -> np.ndarray:
        if self.is_packed:
            return unpack_indices(self.store.read(self.source_name)).astype(np.float32) - 1.0
        return self.store.read_as(self.source_name, np.float32)

    def codes(self) -> np.ndarray:
        """The int8 ``[N, K]`` codes."""
        if self.kind == "packed":
            return (self.lut_indices().view(np.int8) - np.int8(1)).astype(np.int8, copy=False)
        w = self._float_weight()
        if self.kind == "online":
            scale = self._online_scale(w)
            q = np.rint(w * scale)
            np.clip(q, -1, 1, out=q)
            return q.astype(np.int8)
        a = np.abs(w)
        mag = float(a.max()) if a.size else 0.0
        bad = (a != 0) & (a != mag)
        if np.any(bad):
            v = float(w[bad][0])
            raise ModelLoadError(f"{self._where()}: weight is not ternary (found {v!r} next to magnitude {mag!r}); "
                                 "an offline BitNet checkpoint stores {-a, 0, a}. Is quantization_mode 'online'?")
        self._magnitude = mag if mag > 0 else 1.0
        return np.sign(w).astype(np.int8)

    @staticmethod
    def _online_scale(w: np.ndarray) -> np.float32:
        mean = np.float32(np.abs(w).mean(dtype=np.float64))
        return np.float32(1.0) / max(mean, np.float32(WEIGHT_QUANT_EPS))

    def magnitude(self) -> float:
        """The value a code of 1 stands for (1 for packed codes); reads the weight once if needed."""
        if self.kind == "packed":
            return 1.0
        if self._magnitude is None:
            if self.kind == "online":
                # WeightQuant casts round(W*s)/s back to the model's run dtype; we compute in float32,
                # the dtype transformers runs a checkpoint in when asked for float32.
                self._magnitude = float(np.float32(1.0) / self._online_scale(self._float_weight()))
            else:
                self.codes()
        assert self._magnitude is not None
        return self._magnitude


class ScaledAlpha(ir.LazyTensor):
    """float32 ``[]`` Alpha = magnitude(codes) * factor, evaluated when first needed (then cached)."""

    def __init__(self, codes: TernaryCodes, factor: float, *, name: str) -> None:
        self.codes_tensor = codes
        self.factor = factor
        super().__init__(self._make, dtype=ir.DataType.FLOAT, shape=ir.Shape([]), name=name, cache=True)

    def _make(self) -> ir.TensorProtocol:
        v = np.float32(self.codes_tensor.magnitude() * self.factor)
        if not math.isfinite(float(v)):
            raise ModelLoadError(f"{self.codes_tensor._where()}: BitLinear scale is {float(v)!r}; expected a finite number")
        return ir.tensor(np.asarray(v, dtype=np.float32), name=self.name)
