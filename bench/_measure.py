"""Measure commands' wall time, CPU time and peak RSS in fresh processes (os.wait4), for the benchmarks.

``interleaved`` runs several commands alternately (load drifts on a shared machine hit them alike) and
returns :class:`Runs`, whose best / median / per-pair ratios and printed table the benches share.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
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


@dataclass(frozen=True)
class Runs:
    """Every run of each command, in the order they ran."""

    by_name: dict[str, list[Measured]]

    def best(self, name: str) -> Measured:
        """The fastest run (with its peak RSS): the one least disturbed by noise."""
        return min(self.by_name[name], key=lambda m: m.wall_s)

    def median(self, name: str, attr: str = "wall_s") -> float:
        return statistics.median(getattr(m, attr) for m in self.by_name[name])

    def pair_ratio(self, num: str, den: str, attr: str = "wall_s") -> float:
        """Median over the rounds of ``num``'s figure / ``den``'s in the same round."""
        return statistics.median(getattr(a, attr) / getattr(b, attr)
                                 for a, b in zip(self.by_name[num], self.by_name[den], strict=True))

    def print_table(self, cpu: bool = False) -> None:
        """best s, median s, (median CPU s,) peak RSS MiB of the best run, one row per command."""
        print(f"{'':10}{'best s':>9}{'median s':>10}" + (f"{'median CPU s':>14}" if cpu else "") + f"{'peak RSS MiB':>15}")
        for k in self.by_name:
            print(f"{k:10}{self.best(k).wall_s:9.2f}{self.median(k):10.2f}"
                  + (f"{self.median(k, 'cpu_s'):14.2f}" if cpu else "") + f"{self.best(k).peak_rss_mb:15.0f}")

    def print_ratios(self, num: str, den: str, goal: str, cpu: bool = False) -> None:
        """``num / den`` wall (best, median, median of pairs; then the goal), CPU if asked, and peak RSS."""
        print(f"{num} / {den} wall: best {self.best(num).wall_s / self.best(den).wall_s:.3f}x, "
              f"median {self.median(num) / self.median(den):.3f}x, median of run pairs "
              f"{self.pair_ratio(num, den):.3f}x ({goal})")
        if cpu:
            print(f"{num} / {den} CPU: median {self.median(num, 'cpu_s') / self.median(den, 'cpu_s'):.3f}x, "
                  f"median of run pairs {self.pair_ratio(num, den, 'cpu_s'):.3f}x")
        print(f"{num} / {den} peak RSS: {self.best(num).peak_rss_mb / self.best(den).peak_rss_mb:.3f}x")


def interleaved(n: int, argvs: Mapping[str, list[str]], ok: Collection[int] = (0,)) -> Runs:
    """Run the commands alternately ``n`` times each; a return code outside ``ok`` stops the bench."""
    out: dict[str, list[Measured]] = {k: [] for k in argvs}
    for _ in range(n):
        for k, argv in argvs.items():
            m = run_measured(argv)
            if m.returncode not in ok:
                raise SystemExit(f"{k} failed with exit code {m.returncode}: {' '.join(argv)}")
            out[k].append(m)
    return Runs(out)
