"""Tests of the runtime stage (bitnet_coreml.runtime) and the predict command."""

from __future__ import annotations
