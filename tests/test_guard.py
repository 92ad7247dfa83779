"""The CLI's one guard: every failure is one ``error:`` line and a documented exit code, never a traceback.

The commands below are registered into the CLI's lazy command table for the test only; the oracle is
the contract written in the issue (exact line, exit code, JSON keys), not the guard's own code.
"""

from __future__ import annotations

import errno
import json
import logging
import warnings

import click
import pytest
from click.testing import CliRunner

from bitnet_coreml import cli
from bitnet_coreml.errors import InputError, stage

log = logging.getLogger("some.library")


@click.command("boom")
@click.option("--kind", default="key")
@click.option("--json", "as_json", is_flag=True)
def boom(kind: str, as_json: bool) -> None:
    """Raise what --kind says."""
    if kind == "key":
        raise KeyError("k")
    if kind == "staged":
        with stage("lower"), stage("lower.fp16"):
            raise TypeError("bad operand")
    if kind == "memory":
        raise MemoryError()
    if kind == "enoent":
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere/x.npz")
    if kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", "/full/out.mlpackage")
    if kind == "warn-then-fail":
        warnings.warn("a library warning\nover two lines", UserWarning, stacklevel=1)
        log.warning("an onnx-ir style warning")
        raise InputError("model.onnx: node 'n1' is bad")
    if kind == "warn-then-ok":
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        click.echo("done")
        return
    if kind == "exit1":
        raise SystemExit(1)


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setitem(cli.COMMANDS, "boom", (__name__, "boom", "test command"))
    monkeypatch.delenv("BITNET_COREML_DEBUG", raising=False)

    def _run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(cli.main, list(args), env=env)

    return _run


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_bug_is_one_internal_error_line(run) -> None:  # type: ignore[no-untyped-def]
    r = run("boom")
    assert r.exit_code == 3
    assert _lines(r.stderr) == ["error: internal error in boom: KeyError: 'k' (rerun with --debug for the traceback)"]
    assert "Traceback" not in r.output


def test_innermost_stage_is_named(run) -> None:  # type: ignore[no-untyped-def]
    r = run("boom", "--kind", "staged")
    assert r.exit_code == 3
    assert _lines(r.stderr) == ["error: internal error in lower.fp16: TypeError: bad operand "
                                "(rerun with --debug for the traceback)"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(run, how: str) -> None:  # type: ignore[no-untyped-def]
    r = run("--debug", "boom") if how == "flag" else run("boom", env={"BITNET_COREML_DEBUG": "1"})
    assert r.exit_code == 3
    assert "Traceback (most recent call last)" in r.stderr
    assert _lines(r.stderr)[-1].startswith("error: internal error in boom: KeyError")


def test_json_failure_is_an_object_on_stdout(run) -> None:  # type: ignore[no-untyped-def]
    r = run("boom", "--json")
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    assert doc == {"error": "InternalError", "exit_code": 3,
                   "message": "internal error in boom: KeyError: 'k' (rerun with --debug for the traceback)"}
    assert len(_lines(r.stderr)) == 1


@pytest.mark.parametrize(("kind", "code", "line"), [
    ("memory", 3, "error: out of memory in boom (MemoryError: (no message)); free memory or use a smaller model/input"),
    ("enoent", 2, "error: /nowhere/x.npz: No such file or directory"),
    ("enospc", 3, "error: /full/out.mlpackage: No space left on device; free disk space and rerun"),
])
def test_known_foreign_errors(run, kind: str, code: int, line: str) -> None:  # type: ignore[no-untyped-def]
    r = run("boom", "--kind", kind)
    assert r.exit_code == code
    assert _lines(r.stderr) == [line]


def test_warnings_never_make_an_error_two_lines(run) -> None:  # type: ignore[no-untyped-def]
    r = run("boom", "--kind", "warn-then-fail")
    assert r.exit_code == 2
    assert _lines(r.stderr) == ["error: model.onnx: node 'n1' is bad"]


def test_warnings_of_a_successful_command_are_one_line_each(run) -> None:  # type: ignore[no-untyped-def]
    r = run("boom", "--kind", "warn-then-ok")
    assert r.exit_code == 0
    assert _lines(r.stderr) == ["warning: UserWarning: a library warning"]


def test_sys_exit_passes_through(run) -> None:  # type: ignore[no-untyped-def]
    r = run("boom", "--kind", "exit1")
    assert r.exit_code == 1
    assert r.stderr == ""
