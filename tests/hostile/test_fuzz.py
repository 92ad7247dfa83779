"""Property-based fuzzing of the file readers (see ``fuzz_readers.py``), in a subprocess with a memory cap.

``make test`` runs a small, derandomised profile; ``pytest -m slow tests/hostile`` runs 1500 examples per reader.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _fuzz(profile: str, timeout: int) -> None:
    r = subprocess.run([sys.executable, "-m", "tests.hostile.fuzz_readers", profile], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"fuzzing found a failure:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    assert f"fuzz ok: {profile}" in r.stdout


def test_readers_survive_mutated_files() -> None:
    _fuzz("default", 600)


@pytest.mark.slow
def test_readers_survive_mutated_files_long() -> None:
    _fuzz("slow", 7200)
