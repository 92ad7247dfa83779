"""Small helpers shared by the op families."""

from __future__ import annotations

from typing import Any

import numpy as np

_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def scalar(value: Any) -> Any:
    """A 0-d / 1-element array as a Python scalar (other values unchanged)."""
    if isinstance(value, np.ndarray):
        return value.reshape(-1)[0].item() if value.size == 1 else value
    if isinstance(value, np.generic):
        return value.item()
    return value


def int_list(value: Any) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def bool_list(value: Any) -> list[bool]:
    return [bool(v) for v in np.asarray(value).reshape(-1)]


def axis_of(value: Any, rank: int) -> int:
    a = int(scalar(value))
    return a + rank if a < 0 else a


def erf(x: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 in float64: absolute error < 1.5e-7, below fp32 resolution near |erf| ~ 1."""
    x64 = np.asarray(x, dtype=np.float64)
    a = np.abs(x64)
    t = 1.0 / (1.0 + _ERF_P * a)
    poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
    return np.sign(x64) * (1.0 - poly * np.exp(-a * a))
