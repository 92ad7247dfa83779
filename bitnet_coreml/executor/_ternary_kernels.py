"""The numba kernels of ``executor/ternary.py`` (2-bit codes, four to a byte, Core ML's layout).

Imported by ``ternary.py`` on first use, so that a process which only holds ternary weights (the fused
decode on the C kernel, ``executor/native.py``) loads no numba. The arithmetic is described in
``ternary.py``; the AVX-512 VNNI variant of the integer matmul is ``executor/_vnni.py``.
"""

from __future__ import annotations

import numba
import numpy as np

from bitnet_coreml.executor._vnni import HAS_VNNI, int_matmul_vnni


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _int_matmul(codes: np.ndarray, planes: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[m, n] = sum_j sum_i planes[m, i, j] * field_i(codes[n, j])`` (fields 0..2, i.e. weight + 1)."""
    n_rows, kb = codes.shape
    m_rows = planes.shape[0]
    for n in range(n_rows):
        row = codes[n]
        for m in range(m_rows):
            x0 = planes[m, 0]
            x1 = planes[m, 1]
            x2 = planes[m, 2]
            x3 = planes[m, 3]
            acc = np.int32(0)
            for j in range(kb):
                b = np.int32(row[j])
                acc += (np.int32(x0[j]) * (b & 3) + np.int32(x1[j]) * ((b >> 2) & 3)
                        + np.int32(x2[j]) * ((b >> 4) & 3) + np.int32(x3[j]) * (b >> 6))
            out[m, n] = acc


# the integer kernel this process uses: AVX-512 VNNI when the CPU has it (executor/_vnni.py), same results
int_matmul = int_matmul_vnni if HAS_VNNI else _int_matmul


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _decode_rows(codes: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[n, 4j:4j+4] = table[codes[n, j]]``."""
    for n in range(codes.shape[0]):
        row = codes[n]
        dst = out[n]
        for j in range(codes.shape[1]):
            t = table[row[j]]
            dst[4 * j] = t[0]
            dst[4 * j + 1] = t[1]
            dst[4 * j + 2] = t[2]
            dst[4 * j + 3] = t[3]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pack_rows(idx: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """One 2-bit index per byte ``[N, K]`` -> four per byte ``[N, K/4]``, LSB first (Core ML's layout)."""
    for n in range(idx.shape[0]):
        src = idx[n]
        dst = out[n]
        for j in range(out.shape[1]):
            dst[j] = np.uint8((src[4 * j] & 3) | ((src[4 * j + 1] & 3) << 2)
                              | ((src[4 * j + 2] & 3) << 4) | ((src[4 * j + 3] & 3) << 6))
