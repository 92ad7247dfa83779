"""bitnet-coreml: BitNet (ternary) graphs to Core ML packages for the Apple Neural Engine.

Pipeline: import (``frontend``) -> graph passes (``passes``) -> check (``check``) -> lower to MIL
(``lower``) -> package (``package``) -> verify -> predict (``executor``, ``runtime``).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
