"""Fixtures for the runtime tests: tiny ML Program packages built with the MIL builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

W = np.array([[0.5, -1.0, 0.25], [1.5, 0.0, -0.5], [-0.75, 0.5, 1.0], [0.0, 2.0, -1.25]], dtype=np.float32)
B = np.array([0.1, -0.2, 0.3, 0.05], dtype=np.float32)


def numpy_oracle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """relu(x @ W.T + B + y), written from the op definitions."""
    return np.maximum(x.astype(np.float64) @ W.T.astype(np.float64) + B + y, 0.0)


def build_tiny(path: Path, *, batch: int = 2) -> Path:
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(batch, 3)), mb.TensorSpec(shape=(batch, 4))])
    def prog(x, y):  # type: ignore[no-untyped-def]
        h = mb.linear(x=x, weight=W, bias=B, name="h")
        return mb.relu(x=mb.add(x=h, y=y), name="out")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.macOS13)
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("pkg") / "tiny.mlpackage")


@pytest.fixture()
def tiny_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((2, 3)).astype(np.float32), "y": rng.standard_normal((2, 4)).astype(np.float32)}
