"""Fixtures shared by the check tests."""

from __future__ import annotations

import onnx
import pytest

from tests.passes.graphs import mlp_block


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The mlp_block ONNX file (a fused BitNet MLP after the default passes: 9 nodes)."""
    p = tmp_path_factory.mktemp("m") / "mlp.onnx"
    onnx.save(mlp_block(), p)
    return str(p)
