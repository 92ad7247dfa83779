"""Helpers shared by the CLI commands: JSON output."""

from __future__ import annotations

import sys
from typing import Any

from bitnet_coreml._json import dump_json

__all__ = ["dump_json", "echo_json"]


def echo_json(obj: Any) -> None:
    sys.stdout.write(dump_json(obj) + "\n")
