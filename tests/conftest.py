"""Project-wide pytest setup: the executor's conformance plugin (adds ``--conformance-full``) and the
session's cache of converted packages (``converted``: ``tests/support/packages.py``)."""

from __future__ import annotations

import pytest

from tests.support.packages import PackageCache

pytest_plugins = ["tests.executor.conformance_plugin"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> PackageCache:
    """Packages converted once per session: ``converted.get(source, **ConvertOptions fields)``."""
    return PackageCache(tmp_path_factory.mktemp("converted"))
