"""Thread budgets for worker processes: no worker pool may oversubscribe the machine's cores.

BLAS (OpenBLAS/MKL/Accelerate), OpenMP and numba each start one thread per core by default, so
``W`` worker processes on ``C`` cores would run ``W x C`` busy threads and spend their time
switching instead of computing. Every worker therefore gets ``C // W`` threads (at least 1).

The libraries read their thread count once, when they are loaded, so the budget has to be in the
environment *before* the worker imports numpy. :func:`pool_initializer` is what a process pool
runs first: this module imports nothing heavy, sets the environment, then unpickles and runs the
real initializer (whose module imports numpy). A library already loaded by then (e.g. imported by
a script that spawned the pool) is limited at run time through ``threadpoolctl`` and numba.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

# Environment variables the common numeric libraries read at load time.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows: no affinity API
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """``cores // workers``, at least 1."""
    return max(1, (cores or available_cores()) // max(1, workers))


def thread_env(threads: int) -> dict[str, str]:
    """The environment variables that cap every numeric library at ``threads`` threads."""
    return {name: str(threads) for name in THREAD_VARS}


def limit_threads(threads: int) -> None:
    """Cap this process at ``threads`` threads: environment for libraries not loaded yet, run-time
    limits for the ones already loaded."""
    os.environ.update(thread_env(threads))
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_limits  # only when numpy is already loaded

        threadpool_limits(limits=threads)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]  # set at import


def pool_payload(initializer: Callable[..., Any], *args: Any) -> bytes:
    """The real initializer and its arguments, pickled so a worker can set its budget before unpickling."""
    return pickle.dumps((initializer, args))


def pool_initializer(threads: int, payload: bytes) -> None:
    """A process pool's initializer: set the thread budget, then run the pickled initializer."""
    limit_threads(threads)
    initializer, args = pickle.loads(payload)  # our own payload, from the parent process
    initializer(*args)
