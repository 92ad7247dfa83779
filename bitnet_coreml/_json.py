"""Stable JSON for everything the project writes or prints (sorted keys, numpy and paths handled)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` hook: numpy scalars/arrays, objects with ``to_dict``, paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dump_json(obj: Any) -> str:
    """Stable JSON: sorted keys, 2-space indent."""
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default)
