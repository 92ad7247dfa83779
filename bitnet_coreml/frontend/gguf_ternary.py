"""llama.cpp's ternary block types (TQ1_0, TQ2_0) straight to our 2-bit LUT indices, and their scales.

Both types hold 256 weights per block and one fp16 scale ``d`` per block; a weight is ``d * q`` with
``q`` in {-1, 0, 1} (ggml-quants.c, ``dequantize_row_tq1_0`` / ``_tq2_0``; gguf-py ``quants.py``):

* **TQ2_0** (66 bytes): ``qs[64]`` then ``d``. Byte ``32*g + m`` holds, in bits ``2l..2l+1``,
  ``q + 1`` of element ``128*g + 32*l + m`` (g in 0..1, l in 0..3, m in 0..31).
* **TQ1_0** (54 bytes): ``qs[48]``, ``qh[4]``, ``d``. Five base-3 digits per byte, stored as
  ``ceil(v * 256 / 243)``; digit ``k`` of byte ``b`` is ``((b * 3**k mod 256) * 3) >> 8`` (= ``q + 1``).
  Bytes ``0..31`` give elements ``32*k + m``, bytes ``32..47`` give ``160 + 16*k + m``, and
  ``qh[0..3]`` (four digits each) give ``240 + 4*k + m``.

``q + 1`` is exactly our LUT index (LUT ``[-1, 0, 1, 0]``), so decoding is shifts, masks and (for
TQ1_0) a uint16 multiply, one row block at a time, into uint8: no float copy of a weight is made.
TQ2_0 goes to both 2-bit layouts the converter asks for (Core ML's LUT bytes, the checkpoint's packed
rows the fp16 analysis feeds ONNX Runtime) byte by byte: four input bytes hold a 4 x 4 matrix of
2-bit fields whose transpose is four output bytes (:func:`_transpose4`, two masked swaps), so a
2B-shaped model's 210 tensors take 0.3 s and 0.7 s of CPU (numba, one pass each over the mapped file).

Scales, exactly: a block whose ``d`` is 0 dequantises to zeros whatever its digits, so its indices
become 1 (code 0); a negative ``d`` flips the block's codes and keeps ``|d|``. Over the blocks that
still hold a non-zero code, :func:`analyse_scales` decides:

* ``tensor``: one ``|d|`` for the whole tensor -> the BitLinear's scalar Alpha;
* ``row``: one ``|d|`` per output row -> a per-channel Alpha ``[N]``;
* ``block``: ``|d|`` varies inside a row. BitLinear cannot carry that; the importer's fallback
  (``gguf_model``) keeps the layer exact as an unfused BitNet linear with a dense fp16 weight, and
  only with ``--allow-dequant``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import onnx_ir as ir
from gguf import GGMLQuantizationType

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.frontend.gguf_file import GGUFFile

BLOCK = 256
TERNARY_TYPES = (GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0)
_ROWS_PER_STEP_BYTES = 16 << 20  # decode budget per step (uint8 indices)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _decode(blocks: np.ndarray, tq1: bool, flip: np.ndarray, out: np.ndarray, packed: bool) -> int:
    """Decode ``blocks`` (uint8 ``[nb, block bytes]``) to LUT indices in one pass.

    ``flip[b]``: 0 keep, 1 zero the block (d == 0), 2 negate it (d < 0). ``packed``: write Core ML's
    2-bit bytes (``out`` uint8 ``[nb, 64]``, element ``4j+i`` of the block in bits ``2i`` of byte ``j``);
    otherwise one index per byte (``out`` ``[nb, 256]``). Returns the first block holding the 2-bit
    value 3 (TQ2_0 only; not ternary), else -1.
    """
    bad = -1
    for b in range(blocks.shape[0]):
        f = flip[b]
        for j in range(64):
            acc = 0
            for i in range(4):
                e = 4 * j + i
                if tq1:  # five (four for qh) base-3 digits per byte, stored as ceil(v * 256 / 243)
                    if e < 160:
                        byte, k = e & 31, e >> 5
                    elif e < 240:
                        byte, k = 32 + ((e - 160) & 15), (e - 160) >> 4
                    else:
                        byte, k = 48 + ((e - 240) & 3), (e - 240) >> 2
                    p3 = 1
                    for _ in range(k):
                        p3 *= 3
                    v = ((((np.int64(blocks[b, byte]) * p3) & 0xFF) * 3) >> 8) & 3
                else:  # byte 32g + m, bits 2l: element 128g + 32l + m
                    v = (np.int64(blocks[b, ((e >> 7) << 5) + (e & 31)]) >> (2 * ((e >> 5) & 3))) & 3
                    if v == 3 and bad < 0:
                        bad = b
                if f == 1:
                    v = np.int64(1)
                elif f == 2:
                    v = 2 - v
                if packed:
                    acc |= v << (2 * i)
                else:
                    out[b, e] = v
            if packed:
                out[b, j] = acc
    return bad


@numba.njit(cache=True, nogil=True, inline="always")
def _transpose4(w: int) -> int:
    """Transpose the 4 x 4 matrix of 2-bit fields in ``w`` (row ``r`` = byte ``r``, column ``c`` = bits ``2c``)."""
    t = ((w >> 12) ^ w) & 0x0000F0F0  # swap the off-diagonal 2 x 2 blocks
    w ^= t ^ (t << 12)
    t = ((w >> 6) ^ w) & 0x00CC00CC  # then the off-diagonal fields inside each block
    return w ^ t ^ (t << 6)


@numba.njit(cache=True, nogil=True, inline="always")
def _flip_fields(x: int, f: int, ones: int) -> int:
    """2-bit indices ``x`` (``ones``: 0x55 for a byte, 0x55555555 for a word) with a block's flip applied
    (``f`` as in :func:`_decode`)."""
    if f == 1:
        return ones  # d == 0: every index 1 (code 0)
    if f == 2:
        return x ^ ((~x & ones) << 1)  # 0 <-> 2, 1 stays: the codes negated
    return x


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _tq2_lut2(blocks: np.ndarray, flip: np.ndarray, out: np.ndarray) -> int:
    """TQ2_0 ``blocks`` (uint8 ``[nb, 66]``) to Core ML's 2-bit bytes ``out`` (uint8 ``[nb, 64]``), byte-wise.

    Bytes ``32g + 4q .. 32g + 4q + 3`` hold elements ``128g + 32l + 4q + i`` (byte ``i``, bits ``2l``);
    output byte ``32g + 8l + q`` holds the same four elements in bits ``2i``: a 4 x 4 transpose of
    2-bit fields per 4 input bytes. Returns the first block holding the value 3, else -1.
    """
    bad = -1
    for b in range(blocks.shape[0]):
        f = flip[b]
        for g in range(2):
            for q in range(8):
                o = 32 * g + 4 * q
                w = (np.uint32(blocks[b, o]) | (np.uint32(blocks[b, o + 1]) << 8)
                     | (np.uint32(blocks[b, o + 2]) << 16) | (np.uint32(blocks[b, o + 3]) << 24))
                if bad < 0 and (w & (w >> 1) & 0x55555555) != 0:
                    bad = b
                w = _transpose4(_flip_fields(w, f, np.uint32(0x55555555)))
                for c in range(4):
                    out[b, 32 * g + 8 * c + q] = (w >> (8 * c)) & 0xFF
    return bad


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _tq2_packed(blocks: np.ndarray, flip: np.ndarray, out: np.ndarray) -> int:
    """TQ2_0 ``blocks`` (uint8 ``[N, K/256, 66]``) to the checkpoint's packed layout ``out`` (uint8 ``[N/4, K]``:
    row ``i*N/4 + r`` in bits ``2i`` of row ``r``): the four rows' ``qs`` bytes at one position, transposed.
    Returns the first flat block index (``row * K/256 + block``) holding the value 3, else -1."""
    rows = out.shape[0]
    per_row = blocks.shape[1]
    bad = -1
    for r in range(rows):
        for bi in range(per_row):
            for g in range(2):
                for m in range(32):
                    w = np.uint32(0)
                    for i in range(4):
                        x = np.uint32(blocks[i * rows + r, bi, 32 * g + m])
                        if bad < 0 and (x & (x >> 1) & 0x55) != 0:
                            bad = (i * rows + r) * per_row + bi
                        w |= np.uint32(_flip_fields(x, flip[i * rows + r, bi], np.uint32(0x55))) << (8 * i)
                    w = _transpose4(w)
                    base = 256 * bi + 128 * g + m
                    for c in range(4):
                        out[r, base + 32 * c] = (w >> (8 * c)) & 0xFF
    return bad


def block_scales(gf: GGUFFile, name: str) -> np.ndarray:
    """The fp16 ``d`` of every block as float32 ``[rows, blocks per row]`` (the last 2 bytes of each block)."""
    b = gf.blocks(name)
    return np.ascontiguousarray(b[:, :, -2:]).view(np.float16)[..., 0].astype(np.float32)


@dataclass(frozen=True)
class ScaleLayout:
    """How a ternary tensor's block scales map onto a BitLinear (see the module docstring)."""

    kind: str  # "tensor" | "row" | "block"
    alpha: np.ndarray  # float32 [] (tensor) or [N] (row); for "block", the [N, K/256] |d| matrix
    distinct: int  # distinct |d| over the blocks that hold a non-zero code

    def describe(self) -> str:
        return {"tensor": "one block scale for the tensor", "row": "one block scale per row",
                "block": f"{self.distinct} distinct block scales within rows"}[self.kind]


def analyse_scales(d: np.ndarray, active: np.ndarray | None = None) -> ScaleLayout:
    """Classify block scales ``d [N, G]``; ``active`` marks blocks holding a non-zero code (default d != 0)."""
    a = np.abs(d)
    act = (a != 0) if active is None else (active & (a != 0))
    vals = a[act]
    distinct = int(np.unique(vals).size) if vals.size else 0
    if distinct <= 1:
        return ScaleLayout("tensor", np.asarray(np.float32(vals[0] if vals.size else 1.0)), distinct)
    # per row: every active block of a row equals the row's first active one
    first = np.where(act.any(axis=1), a[np.arange(a.shape[0]), act.argmax(axis=1)], np.float32(1.0))
    if np.all(~act | (a == first[:, None])):
        return ScaleLayout("row", first.astype(np.float32), distinct)
    return ScaleLayout("block", a.astype(np.float32), distinct)


class GGUFTernary(ir.LazyTensor):
    """int8 ``[N, K]`` ternary codes of one TQ1_0 / TQ2_0 tensor, decoded on demand from the mapped file.

    Exposes what the BitLinear lowering asks a ternary tensor for (``lut_indices``, ``lut2_bytes``)
    so the 2-bit weight is built from the blocks without an int8 or float copy; ``scales`` is the
    :class:`ScaleLayout` the importer turned into Alpha. ``dequantized()`` (float32, for the fallback
    and tests) equals gguf's own dequantiser bit for bit.
    """

    # ``kind``/``is_packed``/``packed_source`` as a packed checkpoint weight: the fp16-safety analysis feeds
    # ONNX Runtime these 2-bit bytes (a quarter of the int8 codes) and unpacks them in the graph.
    kind = "packed"
    is_packed = True

    def __init__(self, gf: GGUFFile, source: str, *, name: str | None = None) -> None:
        info = gf.tensors[source]
        if info.type not in TERNARY_TYPES or len(info.shape) != 2:
            raise ValueError(f"{source}: not a 2-D TQ1_0/TQ2_0 tensor")
        self.gf, self.source_name, self.qtype = gf, source, info.type
        self.source_dtype = info.type.name
        d = block_scales(gf, source)
        if not np.all(np.isfinite(d)):
            r, g = np.argwhere(~np.isfinite(d))[0]
            raise ModelLoadError(f"{gf.path}: tensor {source!r} block {g} of row {r} has scale {float(d[r, g])!r}; "
                                 "expected a finite number")
        self._d = d
        self._flip = np.where(d == 0, 1, np.where(d < 0, 2, 0)).astype(np.int8)  # see _decode
        self.scales = analyse_scales(d)
        self.is_packed = info.shape[0] % 4 == 0  # packed_source() exists
        super().__init__(lambda: ir.tensor(self.codes()), dtype=ir.DataType.INT8, shape=ir.Shape(list(info.shape)),
                         name=name or source)

    def _where(self) -> str:
        return f"{self.gf.path}: tensor {self.source_name!r}"

    def _decode_rows(self, r0: int, r1: int, *, packed: bool) -> np.ndarray:
        """Rows ``[r0, r1)`` as LUT indices (uint8 ``[rows, K]``) or Core ML 2-bit bytes (``[rows, K/4]``),
        with the block scales' signs and zeros applied."""
        blocks = self.gf.blocks(self.source_name, (r0, r1))
        rows, per_row, size = blocks.shape
        flip = np.ascontiguousarray(self._flip[r0:r1]).reshape(-1)
        out = np.empty((rows * per_row, BLOCK // 4 if packed else BLOCK), dtype=np.uint8)
        flat = np.ascontiguousarray(blocks.reshape(rows * per_row, size))
        if packed and self.qtype == GGMLQuantizationType.TQ2_0:
            bad = _tq2_lut2(flat, flip, out)
        else:
            bad = _decode(flat, self.qtype == GGMLQuantizationType.TQ1_0, flip, out, packed)
        self._check(bad, r0, per_row)
        return out.reshape(rows, -1)

    def _check(self, bad: int, r0: int, per_row: int) -> None:
        if bad >= 0:
            raise ModelLoadError(f"{self._where()}: block {bad % per_row} of row {r0 + bad // per_row} holds the "
                                 "2-bit value 3 (weight +2d), which is not ternary; allowed 0, 1, 2 (= -d, 0, +d)")

    def _rows(self, packed: bool) -> np.ndarray:
        n, k = (int(x) for x in self.shape.numpy())
        if packed and self.qtype == GGMLQuantizationType.TQ2_0:  # one byte-wise pass over the whole tensor
            return self._decode_rows(0, n, packed=True)
        out = np.empty((n, k // 4 if packed else k), dtype=np.uint8)
        step = max(1, _ROWS_PER_STEP_BYTES // max(1, k))
        for r in range(0, n, step):
            out[r:r + step] = self._decode_rows(r, min(n, r + step), packed=packed)
        return out

    def lut_indices(self) -> np.ndarray:
        """uint8 ``[N, K]`` in {0, 1, 2} = code + 1 (the 2-bit palette indices for LUT ``[-1, 0, 1, 0]``)."""
        return self._rows(packed=False)

    def lut2_bytes(self) -> np.ndarray:
        """The indices packed four to a byte in Core ML's ``constexpr_lut_to_dense`` order: uint8 ``[N*K/4]``,
        decoded straight from the blocks (K is a multiple of 256, so rows end on whole bytes)."""
        return self._rows(packed=True).reshape(-1)

    def packed_source(self) -> np.ndarray | None:
        """The indices in the checkpoint's packed layout, uint8 ``[N/4, K]`` (row block ``i`` of ``N/4`` rows
        in bits ``2i..2i+1``), or None when N is not a multiple of 4."""
        n = int(self.shape.numpy()[0])
        if n % 4:
            return None
        r = n // 4
        if self.qtype == GGMLQuantizationType.TQ2_0:
            out = np.empty((r, int(self.shape.numpy()[1])), dtype=np.uint8)
            self._check(_tq2_packed(self.gf.blocks(self.source_name), self._flip, out), 0, self._flip.shape[1])
            return out
        out = self._decode_rows(0, r, packed=False)
        for i in range(1, 4):
            out |= self._decode_rows(i * r, (i + 1) * r, packed=False) << np.uint8(2 * i)
        return out

    def codes(self) -> np.ndarray:
        return (self.lut_indices().view(np.int8) - np.int8(1)).astype(np.int8, copy=False)

    def dequantized(self) -> np.ndarray:
        """float32 ``[N, K]``: ``d * q`` per block (for the block-scale fallback and for tests)."""
        n, k = (int(x) for x in self.shape.numpy())
        q = self.codes().astype(np.float32).reshape(n, k // BLOCK, BLOCK)
        return (np.abs(self._d)[:, :, None] * q).reshape(n, k)

    def magnitude(self) -> float:
        return 1.0

