"""Measure a command's wall time and peak RSS in a fresh process (os.wait4), for the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    cpu_s: float = 0.0  # user + system CPU time of the process (a load-independent figure on a shared machine)


def run_measured(argv: list[str], env: dict[str, str] | None = None, quiet: bool = True) -> Measured:
    """Run ``argv`` and return its wall time and peak resident set size (MB, from the kernel)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.DEVNULL if quiet else None)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(wall, rusage.ru_maxrss / 1024.0, proc.returncode, rusage.ru_utime + rusage.ru_stime)


def python_snippet(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def best_of(n: int, argv: list[str]) -> Measured:
    """Best wall time of ``n`` runs (with the peak RSS of that run): the least disturbed by noise."""
    runs = [run_measured(argv) for _ in range(n)]
    for r in runs:
        if r.returncode != 0:
            raise SystemExit(f"command failed with exit code {r.returncode}: {' '.join(argv)}")
    return min(runs, key=lambda r: r.wall_s)
