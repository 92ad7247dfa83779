"""llama.cpp's TQ1_0 blocks to 2-bit LUT indices: a numba kernel, imported only when a TQ1_0 tensor is decoded.

TQ1_0 (54 bytes per 256 weights: ``qs[48]``, ``qh[4]``, fp16 ``d``) stores five base-3 digits per byte as
``ceil(v * 256 / 243)``; digit ``k`` of byte ``b`` is ``((b * 3**k mod 256) * 3) >> 8`` (= ``q + 1``, our LUT
index). Bytes ``0..31`` give elements ``32*k + m``, bytes ``32..47`` give ``160 + 16*k + m``, and
``qh[0..3]`` (four digits each) give ``240 + 4*k + m`` (ggml-quants.c, ``dequantize_row_tq1_0``).
The layouts themselves are described in :mod:`bitnet_coreml.frontend.gguf_ternary`, which calls this
module lazily so that importing (or converting) a TQ2_0 file never loads numba and its LLVM.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, boundscheck=False)
def decode_tq1(blocks: np.ndarray, flip: np.ndarray, out: np.ndarray, packed: bool) -> None:
    """Decode TQ1_0 ``blocks`` (uint8 ``[nb, 54]``) to LUT indices in one pass.

    ``flip[b]``: 0 keep, 1 zero the block (d == 0), 2 negate it (d < 0). ``packed``: write Core ML's
    2-bit bytes (``out`` uint8 ``[nb, 64]``, element ``4j+i`` of the block in bits ``2i`` of byte ``j``);
    otherwise one index per byte (``out`` ``[nb, 256]``). Base-3 digits are never 3: nothing to validate.
    """
    for b in range(blocks.shape[0]):
        f = flip[b]
        for j in range(64):
            acc = 0
            for i in range(4):
                e = 4 * j + i
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
