"""``bitnet_coreml.lower`` and ``bitnet_coreml.package`` name their public API: every listed name resolves to
the object its module defines, and importing the package alone imports none of them (nor coremltools)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["bitnet_coreml.lower", "bitnet_coreml.package"])
def test_every_public_name_resolves(package: str) -> None:
    mod = importlib.import_module(package)
    assert mod.__doc__ and len(mod.__doc__.splitlines()) > 3
    assert mod.__all__
    for name in mod.__all__:
        sub = importlib.import_module(f"{package}.{mod._EXPORTS[name]}")
        assert getattr(mod, name) is getattr(sub, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mod.nope  # noqa: B018


def test_importing_the_faces_is_cheap() -> None:
    code = ("import sys, bitnet_coreml.lower, bitnet_coreml.package; "
            "print('coremltools' in sys.modules, 'bitnet_coreml.lower.program' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
