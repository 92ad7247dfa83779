"""Project-wide pytest setup: the executor's conformance plugin (adds ``--conformance-full``), the
session's cache of converted packages (``converted``: ``tests/support/packages.py``) and the fused
decode's C kernel (``native_kernel``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.packages import PackageCache

pytest_plugins = ["tests.executor.conformance_plugin"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> PackageCache:
    """Packages converted once per session: ``converted.get(source, **ConvertOptions fields)``."""
    return PackageCache(tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="session")
def native_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The C kernel of the fused decode for the current source: the library ``make setup`` built, or, when
    the source changed since (a developer running pytest directly), one built once for this session in a
    temporary directory that this process and its subprocesses then use (``BITNET_COREML_NATIVE_DIR``)."""
    from bitnet_coreml.executor import native

    kernel, _ = native.load()
    if kernel is not None:
        yield kernel
        return
    folder = tmp_path_factory.mktemp("native")
    old = os.environ.get(native.DIR_ENV)
    os.environ[native.DIR_ENV] = str(folder)
    try:
        kernel, why = native.load(native.build(folder))
        assert kernel is not None, why
        yield kernel
    finally:
        if old is None:
            os.environ.pop(native.DIR_ENV, None)
        else:
            os.environ[native.DIR_ENV] = old
