"""Helpers shared by the CLI commands: JSON output and rich tables."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dump_json(obj: Any) -> str:
    """Stable JSON: sorted keys, 2-space indent."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_default)


def echo_json(obj: Any) -> None:
    sys.stdout.write(dump_json(obj) + "\n")
