"""glibc's mmap threshold is set by the CLI for the commands that run ONNX Runtime, never by importing or
calling the library (a process-wide setting glibc cannot undo)."""

from __future__ import annotations

import ast
import platform
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner

from bitnet_coreml import cli, memory

PACKAGE = Path(__file__).resolve().parents[1] / "bitnet_coreml"


def test_only_the_memory_module_calls_mallopt() -> None:
    callers = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "mallopt":
                callers.append(p.relative_to(PACKAGE).as_posix())
    assert callers == ["memory.py"]


def test_cli_sets_it_for_ort_commands_only() -> None:
    calls: list[int] = []
    with mock.patch.object(memory, "mmap_large_allocations", lambda: calls.append(1) or True):
        CliRunner().invoke(cli.main, ["verify", "missing.onnx", "missing.mlpackage"])
        assert calls == [1]
        CliRunner().invoke(cli.main, ["predict", "missing.mlpackage", "--input", "x.npz"])
        CliRunner().invoke(cli.main, ["info", "--json"])
        assert calls == [1]
    assert cli.HEAP_BOUND_COMMANDS == {"convert", "verify", "report", "pipeline"}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_mallopt_accepts_the_threshold() -> None:
    assert memory.mmap_large_allocations() is True  # glibc's mallopt returns 1 on success
