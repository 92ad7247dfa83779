"""Tight comparisons against torch that absorb activation-rounding flips, and still fail on real errors.

BitLinear quantises every activation row to 8 bits, ``round(x * 127 / max|x|)``. When one ``x * scale``
lies within float32 rounding of a .5 boundary, two correct float32 implementations of the same
arithmetic (torch; ONNX Runtime and the reference executor on the converted graph) can round it to
neighbouring codes. The logits of that position then move by up to a few 1e-2, and so can those of
later positions, which read its keys and values. (The bundled ``bitnet-tiny-packed`` trained with seed
10 has one: position 14, 0.056 in the logits, 0.027 at position 15.) An fp16 package does the same at
fp16 steps: a different accumulation order (a one-token decode call vs a whole-sequence call) rounds
one logit to the neighbouring fp16 value (seed 13: 1 fp16 step in one row).

:func:`close_except_flips` compares row by row (one row per position). Rows beyond the tolerance are
*flagged* and must be explained: at each flagged row the result must agree, at the same tolerance, with
a second implementation of the same arithmetic that shares no code with what is under test (the
caller's ``second`` oracle: ONNX Runtime on the source graph, the stateless package, ...), stay within
``flag_cosine`` of torch with the same argmax, and at most ``max_flagged`` rows may be flagged: a flip
moves one position and some after it, a bug (in the cache, a position, a kernel) moves most of them.
The number of flagged rows is returned for the test to report (``record_property``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def close_except_flips(got: np.ndarray, ref: np.ndarray, atol: float | np.ndarray,
                       second: Callable[[np.ndarray], np.ndarray], *, max_flagged: int,
                       flag_cosine: float = 0.9999, what: str = "logits") -> int:
    """``got`` [rows, V] within ``atol`` of ``ref`` (torch) at every row not flagged; see the module docstring.

    ``atol``: one tolerance, or one per row. ``second(rows)`` returns the second oracle's rows ``rows``.
    Returns how many rows were flagged.
    """
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    tol = np.broadcast_to(np.asarray(atol, np.float64), got.shape[:1])
    err = np.abs(got.astype(np.float64) - ref).max(-1)
    rows = np.nonzero(err > tol)[0]
    if rows.size == 0:
        return 0
    where = ", ".join(f"{r}: {err[r]:.3g} > {tol[r]:.3g}" for r in rows)
    assert rows.size <= max_flagged, f"{what}: {rows.size} rows differ from torch (at most {max_flagged} can be " \
                                     f"rounding flips): {where}"
    other = np.asarray(second(rows), np.float32)
    assert other.shape == (rows.size, got.shape[1]), other.shape
    off = np.abs(got[rows].astype(np.float64) - other).max(-1)
    assert (off <= tol[rows]).all(), f"{what}: rows {where} differ from torch and the second oracle differs " \
                                     f"from them too ({off.tolist()}): not a rounding flip"
    c = _cos(got[rows], ref[rows])
    assert c.min() >= flag_cosine, f"{what}: flagged rows {rows.tolist()} have cosine {c.tolist()} to torch"
    assert (got[rows].argmax(-1) == ref[rows].argmax(-1)).all(), f"{what}: argmax moved at flagged rows {rows}"
    return int(rows.size)


def equal_except_rounding(got: np.ndarray, same: np.ndarray, ref: np.ndarray, *, max_flagged: int,
                          what: str = "logits") -> int:
    """``got`` [rows, V] bit-identical to ``same`` (another fp16 package over the same tokens), except at
    rows where the two round differently (see the module docstring); returns how many rows were flagged.

    At a flagged row ``got`` may be no further from the independent oracle ``ref`` (torch) than ``same``
    is, plus one fp16 step of the row's largest |logit|, and at most ``max_flagged`` rows may be flagged.
    """
    got, same, ref = (np.asarray(a, np.float64) for a in (got, same, ref))
    assert got.shape == same.shape == ref.shape, (got.shape, same.shape, ref.shape)
    rows = np.nonzero((got != same).any(-1))[0]
    if rows.size == 0:
        return 0
    step = np.spacing(np.abs(same[rows]).max(-1).astype(np.float16)).astype(np.float64)
    moved = np.abs(got[rows] - same[rows]).max(-1)
    where = ", ".join(f"{r}: {m:.3g} ({m / s:.0f} fp16 steps)" for r, m, s in zip(rows, moved, step, strict=True))
    assert rows.size <= max_flagged, f"{what}: {rows.size} rows differ (at most {max_flagged} can be rounding " \
                                     f"flips): {where}"
    far_got = np.abs(got[rows] - ref[rows]).max(-1)
    far_same = np.abs(same[rows] - ref[rows]).max(-1)
    assert (far_got <= far_same + step).all(), f"{what}: rows {where} differ and are further from torch " \
                                               f"({far_got.tolist()}) than the other package ({far_same.tolist()})"
    return int(rows.size)
