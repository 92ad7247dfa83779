"""coremltools' MIL op test classes (iOS14..iOS18), collected here so they run through ReferenceExecutor.

Each class is re-exported as ``Test_<opset>_<module>__<Class>``; the conftest next to this file
patches the prediction step. coremltools' expected outputs and tolerances are the oracle.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from bitnet_coreml._quiet import coremltools

coremltools()

_BASE = "coremltools.converters.mil.mil.ops.tests"


# module -> why it cannot be imported here (e.g. it needs torch, which is not a dependency)
IMPORT_FAILURES: dict[str, str] = {}


def _collect() -> dict[str, type]:
    found: dict[str, type] = {}
    for opset in ("iOS14", "iOS15", "iOS16", "iOS17", "iOS18"):
        pkg = importlib.import_module(f"{_BASE}.{opset}")
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("test_"):
                continue
            try:
                mod = importlib.import_module(f"{_BASE}.{opset}.{info.name}")
            except Exception as e:  # noqa: BLE001 - reported as an excluded module below
                IMPORT_FAILURES[f"{opset}.{info.name}"] = f"{type(e).__name__}: {e}"
                continue
            for name, obj in vars(mod).items():
                if inspect.isclass(obj) and name.startswith("Test") and obj.__module__ == mod.__name__:
                    found[f"Test_{opset}_{info.name.removeprefix('test_')}__{name}"] = obj
    return found


globals().update(_collect())


@pytest.mark.parametrize("module", sorted(IMPORT_FAILURES) or ["none"])
def test_module_importable(module: str) -> None:
    """Records coremltools test modules that cannot be imported here (their cases are excluded)."""
    if module == "none":
        return
    pytest.skip(f"excluded: coremltools test module {module} cannot be imported: {IMPORT_FAILURES[module]}")
