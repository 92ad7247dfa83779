"""Project-wide pytest setup: the executor's conformance plugin (adds ``--conformance-full``)."""

from __future__ import annotations

pytest_plugins = ["tests.executor.conformance_plugin"]
