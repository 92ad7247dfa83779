"""llama.cpp's ternary block types (TQ1_0, TQ2_0) straight to our 2-bit LUT indices, and their scales.

Both types hold 256 weights per block and one fp16 scale ``d`` per block; a weight is ``d * q`` with
``q`` in {-1, 0, 1} (ggml-quants.c, ``dequantize_row_tq1_0`` / ``_tq2_0``; gguf-py ``quants.py``):

* **TQ2_0** (66 bytes): ``qs[64]`` then ``d``. Byte ``32*g + m`` holds, in bits ``2l..2l+1``,
  ``q + 1`` of element ``128*g + 32*l + m`` (g in 0..1, l in 0..3, m in 0..31).
* **TQ1_0** (54 bytes): ``qs[48]``, ``qh[4]``, ``d``. Five base-3 digits per byte, stored as
  ``ceil(v * 256 / 243)``; digit ``k`` of byte ``b`` is ``((b * 3**k mod 256) * 3) >> 8`` (= ``q + 1``).
  Bytes ``0..31`` give elements ``32*k + m``, bytes ``32..47`` give ``160 + 16*k + m``, and
  ``qh[0..3]`` (four digits each) give ``240 + 4*k + m``.

``q + 1`` is exactly our LUT index (LUT ``[-1, 0, 1, 0]``), so decoding is shifts and masks (and
for TQ1_0 a multiply), into uint8: no int8 or float copy of a weight is made.

* **TQ2_0** is decoded with numpy, nothing compiled: four ``qs`` bytes (one little-endian word) hold a
  4 x 4 matrix of 2-bit fields whose transpose (two masked swaps) is four of Core ML's LUT bytes, so a
  2B-shaped model's 210 tensors take 0.75 s of CPU (:func:`_tq2_lut2`); one index per byte is a
  broadcast shift (:func:`_tq2_indices`). The fp16 analysis decodes nothing in Python: ONNX Runtime is
  fed the mapped blocks and unpacks them with BitShift nodes (:meth:`GGUFTernary.calibration_feed`),
  as it unpacks a packed checkpoint's bytes.
* **TQ1_0** (base-3 digits) is decoded by a numba kernel (``gguf_tq1``), imported on first use so that
  a TQ2_0 file never loads numba and its LLVM (0.6 s and ~100 MB in a fresh process).

Scales, exactly: a block whose ``d`` is 0 dequantises to zeros whatever its digits, so its indices
become 1 (code 0); a negative ``d`` flips the block's codes and keeps ``|d|``. Over the blocks that
still hold a non-zero code, :func:`analyse_scales` decides:

* ``tensor``: one ``|d|`` for the whole tensor -> the BitLinear's scalar Alpha;
* ``row``: one ``|d|`` per output row -> a per-channel Alpha ``[N]``;
* ``block``: ``|d|`` varies inside a row. BitLinear cannot carry that. A weight-only linear (``llama``
  files) whose rows have one ``|d|`` per run of columns is split into one BitLinear per run
  (:func:`column_groups`, ``GGUFTernary(cols=...)``); otherwise the importer's fallback (``gguf_model``)
  keeps the layer exact as an unfused linear with a dense fp16 weight, and only with ``--allow-dequant``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from gguf import GGMLQuantizationType

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.frontend.gguf_file import GGUFFile

BLOCK = 256
TERNARY_TYPES = (GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0)
_ROWS_PER_STEP_BYTES = 16 << 20  # decode budget per step (uint8 indices)


_ONES = np.uint32(0x55555555)  # the low bit of every 2-bit field of a word
_SHIFTS = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)  # field l of a TQ2_0 qs byte: bits 2l
_STEP_BLOCKS = 4096  # TQ2_0 blocks per numpy step (256 KB of words: stays in cache)


def _tq2_flip_words(w: np.ndarray, flip: np.ndarray | None) -> None:
    """Apply the blocks' ``flip`` (0 keep, 1 zero: d == 0, 2 negate: d < 0) to 2-bit indices in uint32 words
    ``w [blocks, 16]``, in place: index 1 is code 0; negating swaps 0 and 2."""
    if flip is None or not flip.any():
        return
    w[flip == 1] = _ONES
    neg = flip == 2
    x = w[neg]
    w[neg] = x ^ ((~x & _ONES) << np.uint32(1))


def _tq2_lut2(blocks: np.ndarray, flip: np.ndarray | None) -> tuple[np.ndarray, int]:
    """TQ2_0 ``blocks`` (uint8 ``[nb, 66]``) to Core ML's 2-bit bytes (uint8 ``[nb, 64]``, element ``4j+i`` of a
    block in bits ``2i`` of byte ``j``), and the first block holding the value 3 (not ternary), else -1.

    Bytes ``32g + 4q .. 32g + 4q + 3`` (little-endian word ``8g + q``) hold elements ``128g + 32l + 4q + i``
    (byte ``i``, bits ``2l``); output byte ``32g + 8l + q`` holds the same four elements in bits ``2i``: the
    4 x 4 matrix of 2-bit fields of each word transposed (two masked swaps), then the words' bytes
    regrouped. numpy on uint32 words, 4096 blocks at a time.
    """
    nb = blocks.shape[0]
    out = np.empty((nb, 2, 4, 8), np.uint8)
    step = min(nb, _STEP_BLOCKS)
    w, t = np.empty((step, 16), "<u4"), np.empty((step, 16), "<u4")
    bad = -1
    for s in range(0, nb, step):
        n = min(nb, s + step) - s
        ww, tt = w[:n], t[:n]
        ww.view(np.uint8)[...] = blocks[s:s + n, :64]
        np.right_shift(ww, 1, out=tt)
        tt &= ww
        tt &= _ONES
        if bad < 0 and tt.any():
            bad = s + int(np.flatnonzero(tt.any(axis=1))[0])
        _tq2_flip_words(ww, None if flip is None else flip[s:s + n])
        for shift, mask in ((12, 0x0000F0F0), (6, 0x00CC00CC)):  # swap the off-diagonal blocks, then fields
            np.right_shift(ww, shift, out=tt)
            tt ^= ww
            tt &= np.uint32(mask)
            ww ^= tt
            tt <<= np.uint32(shift)
            ww ^= tt
        out[s:s + n] = ww.view(np.uint8).reshape(n, 2, 8, 4).transpose(0, 1, 3, 2)
    return out.reshape(nb, 64), bad


def _tq2_indices(blocks: np.ndarray, flip: np.ndarray | None) -> tuple[np.ndarray, int]:
    """TQ2_0 ``blocks`` (uint8 ``[nb, 66]``) to one LUT index per byte (uint8 ``[nb, 256]``: field ``l`` of byte
    ``32g + m`` is element ``128g + 32l + m``), and the first block holding the value 3, else -1."""
    nb = blocks.shape[0]
    out = (blocks[:, :64].reshape(nb, 2, 1, 32) >> _SHIFTS) & np.uint8(3)  # [nb, g, l, m]
    out = out.reshape(nb, 256)
    three = (out == 3).any(axis=1)
    bad = int(np.flatnonzero(three)[0]) if three.any() else -1
    if flip is not None:
        out[flip == 1] = 1
        out[flip == 2] = 2 - out[flip == 2]
    return out, bad


def block_scales(gf: GGUFFile, name: str, row_order: np.ndarray | None = None) -> np.ndarray:
    """The fp16 ``d`` of every block as float32 ``[rows, blocks per row]`` (the last 2 bytes of each block),
    rows in ``row_order`` when given."""
    d = gf.blocks(name)[:, :, -2:].view("<f2")[..., 0].astype(np.float32)  # a strided read of the mapped file
    return d if row_order is None else d[row_order]


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


def column_groups(d: np.ndarray, limit: int) -> list[tuple[int, int]] | None:
    """Split the block columns of scales ``d [N, G]`` into the fewest runs ``[(b0, b1), ...]`` inside which every
    row's non-zero ``|d|`` are one value (so each run is a linear with a per-row or per-tensor scale), or None
    when that takes more than ``limit`` runs. TriLM's model-parallel shards give one scale per input-column
    shard of o_proj / down_proj: a few runs. Exact only without activation quantisation (a weight-only
    linear is the sum of its column groups' products; BitNet's absmax would be taken per group)."""
    a = np.abs(d)
    runs: list[tuple[int, int]] = []
    start, ref = 0, a[:, 0].copy()
    for j in range(1, a.shape[1]):
        col = a[:, j]
        if np.any((col != 0) & (ref != 0) & (col != ref)):
            runs.append((start, j))
            if len(runs) >= limit:
                return None
            start, ref = j, col.copy()
        else:
            ref = np.where(ref == 0, col, ref)
    runs.append((start, a.shape[1]))
    return runs


class GGUFTernary(ir.LazyTensor):
    """int8 ``[N, K]`` ternary codes of one TQ1_0 / TQ2_0 tensor, decoded on demand from the mapped file.

    Exposes what the BitLinear lowering asks a ternary tensor for (``lut_indices``, ``lut2_bytes``)
    so the 2-bit weight is built from the blocks without an int8 or float copy; ``scales`` is the
    :class:`ScaleLayout` the importer turned into Alpha. ``dequantized()`` (float32, for the fallback
    and tests) equals gguf's own dequantiser bit for bit.

    ``row_order`` (int ``[N]``): the tensor's rows are the file's rows ``row_order[0], row_order[1], ...``
    (a llama file's q/k rows, permuted by llama.cpp's converter: ``gguf_model.unpermute_rows``); every
    view (indices, 2-bit bytes, scales, the fp16 analysis' feed, the dequantised values) is in that order.
    ``cols = (b0, b1)``: only the block columns ``b0 .. b1-1`` (input features ``256*b0 .. 256*b1-1``), a
    column group of a weight-only linear whose block scales differ between groups (:func:`column_groups`).
    """

    # ``kind``/``is_packed``/``packed_source`` as a packed checkpoint weight: the fp16-safety analysis feeds
    # ONNX Runtime these 2-bit bytes (a quarter of the int8 codes) and unpacks them in the graph.
    kind = "packed"
    is_packed = True

    def __init__(self, gf: GGUFFile, source: str, *, name: str | None = None,
                 row_order: np.ndarray | None = None, cols: tuple[int, int] | None = None) -> None:
        info = gf.tensors[source]
        if info.type not in TERNARY_TYPES or len(info.shape) != 2:
            raise ValueError(f"{source}: not a 2-D TQ1_0/TQ2_0 tensor")
        self.gf, self.source_name, self.qtype = gf, source, info.type
        self.source_dtype = info.type.name
        self.row_order = row_order
        n, k = info.shape
        self.cols = cols or (0, k // BLOCK)
        d = block_scales(gf, source, row_order)[:, self.cols[0]:self.cols[1]]
        if not np.all(np.isfinite(d)):
            r, g = np.argwhere(~np.isfinite(d))[0]
            raise ModelLoadError(f"{gf.path}: tensor {source!r} block {self.cols[0] + g} of row "
                                 f"{self._file_row(int(r))} has scale {float(d[r, g])!r}; expected a finite number")
        self._d = d
        # per block 0 keep, 1 zero (d == 0), 2 negate (d < 0); kept only when some block needs it (a file
        # llama.cpp wrote has d = max |w| >= 0, zero only for an all-zero block, whose codes are 0 anyway)
        flip = np.where(d == 0, 1, np.where(d < 0, 2, 0)).astype(np.int8)
        self._flip: np.ndarray | None = flip if flip.any() else None
        self.scales = analyse_scales(d)
        self.is_packed = info.shape[0] % 4 == 0  # packed_source() exists
        shape = [n, (self.cols[1] - self.cols[0]) * BLOCK]
        super().__init__(lambda: ir.tensor(self.codes()), dtype=ir.DataType.INT8, shape=ir.Shape(shape),
                         name=name or source)

    def _where(self) -> str:
        return f"{self.gf.path}: tensor {self.source_name!r}"

    def _file_row(self, r: int) -> int:
        return r if self.row_order is None else int(self.row_order[r])

    def _blocks(self, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Rows ``[r0, r1)`` of the tensor (in ``row_order``) as their blocks: mapped, or gathered when permuted."""
        if self.row_order is None:
            blocks = self.gf.blocks(self.source_name, rows)
        else:
            order = self.row_order if rows is None else self.row_order[rows[0]:rows[1]]
            blocks = self.gf.blocks(self.source_name)[order]
        b0, b1 = self.cols
        return blocks if (b0, b1) == (0, blocks.shape[1]) else np.ascontiguousarray(blocks[:, b0:b1])

    def _decode_rows(self, r0: int, r1: int, *, packed: bool) -> np.ndarray:
        """Rows ``[r0, r1)`` as LUT indices (uint8 ``[rows, K]``) or Core ML 2-bit bytes (``[rows, K/4]``),
        with the block scales' signs and zeros applied."""
        blocks = self._blocks((r0, r1))
        rows, per_row, size = blocks.shape
        flip = None if self._flip is None else self._flip[r0:r1].reshape(-1)
        flat = blocks.reshape(rows * per_row, size)
        if self.qtype == GGMLQuantizationType.TQ2_0:
            out, bad = (_tq2_lut2 if packed else _tq2_indices)(flat, flip)
            self._check(bad, r0, per_row)
        else:
            from bitnet_coreml.frontend.gguf_tq1 import decode_tq1  # numba: loaded for TQ1_0 only

            out = np.empty((rows * per_row, BLOCK // 4 if packed else BLOCK), dtype=np.uint8)
            flips = np.zeros(rows * per_row, np.int8) if flip is None else np.ascontiguousarray(flip)
            decode_tq1(np.ascontiguousarray(flat), flips, out, packed)
        return out.reshape(rows, -1)

    def _check(self, bad: int, r0: int, per_row: int) -> None:
        if bad >= 0:
            raise ModelLoadError(f"{self._where()}: block {self.cols[0] + bad % per_row} of row "
                                 f"{self._file_row(r0 + bad // per_row)} holds the "
                                 "2-bit value 3 (weight +2d), which is not ternary; allowed 0, 1, 2 (= -d, 0, +d)")

    def _rows(self, packed: bool) -> np.ndarray:
        n, k = (int(x) for x in self.shape.numpy())
        if packed and self.qtype == GGMLQuantizationType.TQ2_0:  # one pass of word-wise steps over the tensor
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
        in bits ``2i..2i+1``), or None when N is not a multiple of 4. What the fp16 analysis feeds ONNX
        Runtime for a TQ1_0 weight (a TQ2_0 weight is fed its own blocks: :meth:`calibration_feed`)."""
        n = int(self.shape.numpy()[0])
        if n % 4:
            return None
        r = n // 4
        out = self._decode_rows(0, r, packed=False)
        for i in range(1, 4):
            out |= self._decode_rows(i * r, (i + 1) * r, packed=False) << np.uint8(2 * i)
        return out

    def calibration_feed(self) -> tuple[np.ndarray, Callable[[Callable[..., ir.Value], ir.Value], ir.Value]] | None:
        """TQ2_0: the tensor's mapped blocks (uint8 ``[N, K/256, 66]``, no copy) and the ONNX nodes turning them
        into float codes ``[N, K]``, for the fp16 analysis (``lower/fp16.py``): ONNX Runtime is fed the file's
        bytes as a packed checkpoint's are, with nothing decoded in Python. None for TQ1_0 (base-3 digits:
        :meth:`packed_source` decodes it)."""
        if self.qtype != GGMLQuantizationType.TQ2_0:
            return None
        return self._blocks(), self._unpack_tq2

    def _unpack_tq2(self, add: Callable[..., ir.Value], blocks: ir.Value) -> ir.Value:
        """ONNX nodes (made with ``add(op, inputs, suffix, **attrs)``): TQ2_0 ``blocks`` -> float codes ``[N, K]``.

        ``qs`` viewed as ``[N, K/256, g=2, 1, m=32]``; shifted left by ``[6, 4, 2, 0]`` (broadcast on the fourth
        axis) then right by 6, field ``l`` lands at element ``256 b + 128 g + 32 l + m``; minus 1, times the
        block's sign (0 where ``d`` is 0, -1 where it is negative) when any block needs it.
        """
        n, k = (int(x) for x in self.shape.numpy())

        def node(op: str, inputs: list[ir.Value], suffix: str, **attrs: object) -> ir.Value:
            return add(op, inputs, f"tq2_{suffix}", **attrs)  # the gate's own nodes are named by add too

        def const(suffix: str, value: np.ndarray) -> ir.Value:
            return node("Constant", [], suffix, value=ir.tensor(value))

        qs = node("Slice", [blocks, const("qs0", np.array([0], np.int64)), const("qs1", np.array([64], np.int64)),
                            const("qs_axis", np.array([2], np.int64))], "qs")
        qs = node("Reshape", [qs, const("qs_shape", np.array([n, k // BLOCK, 2, 1, 32], np.int64))], "qs5")
        left = const("left", np.array([6, 4, 2, 0], np.uint8).reshape(1, 1, 1, 4, 1))
        fields = node("BitShift", [node("BitShift", [qs, left], "shl", direction="LEFT"),
                                   const("right", np.array(6, np.uint8))], "shr", direction="RIGHT")
        # reshaped while uint8 (a quarter of the float bytes, should ORT copy rather than alias)
        flat = [n, k] if self._flip is None else [n, k // BLOCK, BLOCK]
        fields = node("Reshape", [fields, const("flat_shape", np.array(flat, np.int64))], "flat")
        codes = node("Sub", [node("Cast", [fields], "cast", to=int(ir.DataType.FLOAT)),
                             const("one", np.array(1.0, np.float32))], "sub")
        if self._flip is None:
            return codes
        sign = np.where(self._flip == 1, 0.0, np.where(self._flip == 2, -1.0, 1.0)).astype(np.float32)
        codes = node("Mul", [codes, const("sign", sign.reshape(n, k // BLOCK, 1))], "signed")
        return node("Reshape", [codes, const("shape", np.array([n, k], np.int64))], "codes")

    def codes(self) -> np.ndarray:
        return (self.lut_indices().view(np.int8) - np.int8(1)).astype(np.int8, copy=False)

    def dequantized(self) -> np.ndarray:
        """float32 ``[N, K]``: ``d * q`` per block (for the block-scale fallback and for tests)."""
        n, k = (int(x) for x in self.shape.numpy())
        q = self.codes().astype(np.float32).reshape(n, k // BLOCK, BLOCK)
        return (np.abs(self._d)[:, :, None] * q).reshape(n, k)

    def magnitude(self) -> float:
        return 1.0

