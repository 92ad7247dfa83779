"""The README's Python API example runs as written (so the README stays true)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    (tmp_path / "models").symlink_to(ROOT / "models")
    (tmp_path / "out").mkdir()
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "bitnet.mlpackage").is_dir()
    assert "reference" in res.stdout


def readme_commands() -> list[str]:
    """Every ``bitnet-coreml ...`` line of the README's shell blocks, in order, comments removed."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        # a command continued with a trailing backslash is one command
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("bitnet-coreml "):
                lines.append(line.split("  #")[0].strip())
    return lines


# Commands that take more than a few seconds (a second conversion, worker start-up, a pipeline build)
# run only in the slow suite; the rest run in `make test`.
SLOW = ("bigvocab.mlpackage", " batch ", "pipeline run")


def _run_readme(tmp_path: Path, commands: list[str]) -> None:
    import shlex
    import shutil

    for name in ("models", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    for cmd in commands:
        argv = [sys.executable, "-m", "bitnet_coreml.cli", *shlex.split(cmd)[1:]]
        res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
        assert res.returncode == 0, f"README command failed ({res.returncode}): {cmd}\n{res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr, cmd


_PLACEHOLDER = re.compile(r"\[|\(|\.\.\.|\b(MODEL|DATASET|PACKAGE|CHECKPOINT|OUT|TEXT|DIR)\b")


def runnable(commands: list[str]) -> list[str]:
    """The commands written out in full (a line with a placeholder such as MODEL or [--flag] is a synopsis)."""
    return [c for c in commands if not _PLACEHOLDER.search(c)]


def test_readme_commands_are_found() -> None:
    cmds = readme_commands()
    assert all(c.startswith("bitnet-coreml ") for c in cmds)
    # Every command of the issue-19 walkthrough is written out in full, not as a synopsis.
    for sub in ("info", "inspect", "check", "convert", "verify", "predict", "batch", "pipeline run"):
        assert any(c.startswith(f"bitnet-coreml {sub} ") or c == f"bitnet-coreml {sub}" for c in runnable(cmds)), sub
    assert len(runnable(cmds)) >= 11


def test_readme_commands_run_as_written_fast_part(tmp_path: Path) -> None:
    _run_readme(tmp_path, [c for c in runnable(readme_commands()) if not any(s in f" {c} " for s in SLOW)])


@pytest.mark.slow
def test_readme_commands_run_as_written_all(tmp_path: Path) -> None:
    _run_readme(tmp_path, runnable(readme_commands()))
