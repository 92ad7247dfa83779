"""Route coremltools' MIL op tests' prediction step through ReferenceExecutor (see ``conformance_plugin``)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from bitnet_coreml._quiet import coremltools
from tests.executor.conformance_plugin import (
    EXCLUDE_IMAGE,
    EXCLUDE_NEURALNETWORK,
    EXCLUDE_UNSUPPORTED,
    coerce_inputs,
)


def pytest_make_parametrize_id(config: pytest.Config, val: Any, argname: str) -> str:
    # the same readable ids coremltools' own conftest generates
    # one line, bounded: array-valued parameters would otherwise make multi-line node ids
    text = " ".join(str(val).split())
    return f"{argname}={text if len(text) <= 60 else text[:57] + '...'}"


class _MacOSUtils:
    """``coremltools.models.utils`` as compare_backend sees it, reporting a macOS new enough for iOS18."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def _macos_version(self) -> tuple[int, int]:
        # the newest macOS of coremltools 9's matrix; the tests gate "bug fixed in macOS 15.2" on it
        return (15, 5)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _executor(mlmodel: Any) -> Any:
    from bitnet_coreml.errors import UnsupportedOpError
    from bitnet_coreml.executor import ReferenceExecutor

    ex = getattr(mlmodel, "_bitnet_reference_executor", None)
    if ex is None:
        if mlmodel.get_spec().WhichOneof("Type") != "mlProgram":
            pytest.skip(f"excluded: {EXCLUDE_NEURALNETWORK}")
        try:
            # diagnosis knob: BITNET_CONFORMANCE_FP32=1 runs the suite with fp32=True (no fp16 rounding)
            ex = ReferenceExecutor(mlmodel, fp32=os.environ.get("BITNET_CONFORMANCE_FP32") == "1")
        except UnsupportedOpError as e:
            ops = ", ".join(getattr(e, "ops", []) or ["?"])
            pytest.skip(f"excluded: {EXCLUDE_UNSUPPORTED}: {ops}")
        mlmodel._bitnet_reference_executor = ex
    return ex


def _predict(self: Any, data: Any, state: Any = None) -> dict[str, Any]:
    from PIL import Image

    if isinstance(data, (list, tuple)):
        return [_predict(self, d, state) for d in data]  # type: ignore[return-value]
    if any(isinstance(v, Image.Image) for v in data.values()):
        pytest.skip(f"excluded: {EXCLUDE_IMAGE}")
    from bitnet_coreml.errors import InputError, OperationError

    ex = _executor(self)
    try:
        return ex.predict(coerce_inputs(ex.input_specs, dict(data)), state=state)
    except (OperationError, InputError) as e:
        if isinstance(e, InputError) and not str(e).startswith("op "):
            raise  # the inputs did not match the description: not a failed prediction
        # what MLModel.predict raises on macOS when a prediction fails, an op's values out of range
        # included (tests match this text)
        raise RuntimeError(f"Unable to compute the prediction using ML Program: {e}") from e


def _make_state(self: Any) -> Any:
    return _executor(self).make_state()


@pytest.fixture(autouse=True)
def _route_prediction_to_reference_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    ct = coremltools()
    from coremltools.converters.mil import testing_utils

    monkeypatch.setattr(testing_utils, "_IS_MACOS", True)
    monkeypatch.setattr(testing_utils, "coremltoolsutils", _MacOSUtils(testing_utils.coremltoolsutils))
    monkeypatch.setattr(ct.models.MLModel, "predict", _predict)
    monkeypatch.setattr(ct.models.MLModel, "make_state", _make_state)
    # ct.convert ends with gc.collect(), which costs ~0.7 s per case with 17k collected test items in
    # the heap; skipping it changes no result
    from coremltools.converters import _converters_entry

    monkeypatch.setattr(_converters_entry, "gc", _NoGC())


class _NoGC:
    @staticmethod
    def collect(*args: Any) -> int:
        return 0
