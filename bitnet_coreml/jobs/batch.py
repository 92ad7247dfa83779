"""Batch prediction jobs: stream a dataset through a predictor, resumably.

:func:`run_batch` is the one entry point; ``engine="local"`` runs here (in-process for one worker,
a pool of processes otherwise, each loading the package once) and ``engine="ray"`` hands the same
job to :mod:`bitnet_coreml.jobs.ray_engine`. Both share :class:`Job`: the output folder, the
manifest (see :mod:`bitnet_coreml.jobs.manifest` for the crash-safety argument), resume and
statistics, so their output layouts are identical.

The driver holds only item *references* and the items in flight (a bounded window), so memory stays
flat in the dataset size. Every item is processed by :func:`process_item`, which never raises for a
failing item: the failure becomes an ``"error"`` record and the job goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml._threads import pool_initializer, pool_payload, threads_per_worker
from bitnet_coreml.errors import BitnetCoremlError, ConfigError, InputError
from bitnet_coreml.jobs._io import (
    atomic_write_bytes,
    atomic_write_json,
    lock_dir,
    npz_bytes,
    remove_path,
    sha256_bytes,
)
from bitnet_coreml.jobs.datasets import Dataset, ItemRef, load_item, open_dataset, safe_name
from bitnet_coreml.jobs.manifest import (
    OUTPUTS,
    SUMMARY,
    ItemRecord,
    ManifestWriter,
    claim_outdir,
    compact,
    read_manifest,
    verified_done,
)
from bitnet_coreml.jobs.predictors import ItemPredictor, PredictorFactory
from bitnet_coreml.jobs.shards import check_format, combine

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
_RESERVOIR = 10_000  # latency samples kept for percentiles: bounded, so memory stays flat


@dataclass(frozen=True)
class BatchOptions:
    """How to run a job. ``in_flight_per_worker`` bounds the items queued per worker."""

    workers: int = 1
    engine: str = "local"
    in_flight_per_worker: int = 2
    ray_address: str | None = None
    fsync_interval_s: float = 1.0  # see ManifestWriter: 0 = fsync every record
    restart: bool = False  # discard an earlier job's results in the folder instead of resuming
    verbose: bool = False  # let Ray's own INFO/WARNING log lines through (--engine ray)
    output_format: str = "npz"  # npz (one file per item), npz-shards or parquet (one per shard_size items)
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ConfigError(f"workers={self.workers!r}; allowed: an integer >= 1")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r}; allowed: {', '.join(ENGINES)}")
        if not self.fsync_interval_s >= 0:
            raise ConfigError(f"fsync_interval_s={self.fsync_interval_s!r}; allowed: a number >= 0")
        if self.in_flight_per_worker < 1:
            raise ConfigError(f"in_flight_per_worker={self.in_flight_per_worker!r}; allowed: >= 1")
        check_format(self.output_format, self.shard_size)


@dataclass(frozen=True)
class BatchEvent:
    """Progress after each finished item (``record`` is None for the opening event)."""

    total: int
    completed: int  # finished in this run or verified from an earlier one
    ok: int
    failed: int
    skipped: int
    record: ItemRecord | None = None
    to_do: int = 0  # items this run has to predict (not done by an earlier run): the base of an ETA


ProgressFn = Callable[[BatchEvent], None]


def process_item(predictor: ItemPredictor, ref: ItemRef, outdir: Path) -> ItemRecord:
    """Load, predict and write one item; a failure of this item is returned as an error record.

    A predictor with its own ``process_item(ref, outdir)`` (a generation worker, ``jobs/generation.py``)
    handles its items itself, with the same contract.
    """
    own = getattr(predictor, "process_item", None)
    if own is not None:
        return own(ref, outdir)  # type: ignore[no-any-return]
    rel = f"{OUTPUTS}/{safe_name(ref.id)}.npz"
    try:
        inputs = load_item(ref)
        t0 = time.perf_counter()
        outputs, unit = predictor.predict(inputs)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        data = npz_bytes({k: np.asarray(v) for k, v in outputs.items()})
        atomic_write_bytes(outdir / rel, data)
        return ItemRecord(ref.id, ref.index, "ok", rel, sha256_bytes(data), str(unit), round(latency_ms, 4))
    except Exception as e:  # noqa: BLE001 - one bad item must not stop the job: record it and go on
        message = e.one_line() if isinstance(e, BitnetCoremlError) else f"{type(e).__name__}: {e}"
        # A stale (corrupt) output of an earlier run must not outlive the record that disowns it.
        remove_path(outdir / rel)
        return ItemRecord(ref.id, ref.index, "error", error=" ".join(message.split())[:2000])


@dataclass
class _Stats:
    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    units: Counter[str] = field(default_factory=Counter)
    latency_sum: float = 0.0
    latency_max: float = 0.0
    samples: list[float] = field(default_factory=list)
    seen: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, rec: ItemRecord) -> None:
        if rec.status != "ok":
            self.failed += 1
            if len(self.failures) < 20:
                self.failures.append({"id": rec.id, "error": rec.error or ""})
            return
        self.ok += 1
        self.units[rec.unit or "?"] += 1
        lat = float(rec.latency_ms or 0.0)
        self.latency_sum += lat
        self.latency_max = max(self.latency_max, lat)
        self.seen += 1
        if len(self.samples) < _RESERVOIR:
            self.samples.append(lat)
        else:  # reservoir sampling keeps a uniform sample of all latencies in bounded memory
            j = self._rng.randrange(self.seen)
            if j < _RESERVOIR:
                self.samples[j] = lat


class Job:
    """One job's output folder, manifest, resume state and statistics (shared by both engines)."""

    def __init__(self, factory: PredictorFactory, dataset: Dataset, outdir: Path,
                 progress: ProgressFn | None = None, fsync_interval_s: float = 1.0, restart: bool = False) -> None:
        self.factory = factory
        self.dataset = dataset
        self.outdir = outdir
        self.progress = progress
        outdir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_dir(outdir, "another batch job is running on this folder; wait for it or choose another -o")
        try:
            self.resumed = claim_outdir(outdir, {"predictor": factory.fingerprint(),
                                                 "dataset": str(dataset.path.resolve())}, restart)
            self.done = verified_done(outdir, read_manifest(outdir)) if self.resumed else set()
            self.writer = ManifestWriter(outdir, fsync_interval_s)
        except BaseException:
            self._release()
            raise
        self.stats = _Stats(total=len(dataset))
        self.t0 = time.perf_counter()

    def pending(self) -> Iterator[ItemRef]:
        """Items still to do, in dataset order; finished ones are counted as skipped."""
        seen: dict[str, int] = {}
        for ref in self.dataset.refs():
            if ref.id in seen:
                raise InputError(f"dataset {self.dataset.path}: item id {ref.id!r} appears twice"
                                 f" (items {seen[ref.id]} and {ref.index}); ids must be unique")
            seen[ref.id] = ref.index
            if ref.id in self.done:
                self.stats.skipped += 1
                self._emit(None)
                continue
            yield ref

    def record(self, rec: ItemRecord) -> None:
        self.writer.append(rec)
        self.stats.add(rec)
        self._emit(rec)

    def _emit(self, rec: ItemRecord | None) -> None:
        if self.progress is not None:
            s = self.stats
            self.progress(BatchEvent(s.total, s.skipped + s.ok + s.failed, s.ok, s.failed, s.skipped, rec,
                                     s.total - len(self.done)))

    def start(self) -> None:
        self._emit(None)

    def close(self) -> None:
        self.writer.close()
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def finish(self, engine: str, workers: int, extra: dict[str, Any] | None = None,
               output_format: str = "npz", shard_size: int = 1000) -> dict[str, Any]:
        """Combine complete shards (``npz-shards``/``parquet``), compact the manifest, write ``summary.json``."""
        shards = 0
        if output_format != "npz":
            shards = combine(self.outdir, read_manifest(self.outdir), self.stats.total, output_format, shard_size,
                             self.writer)
        self.writer.close()
        wall = time.perf_counter() - self.t0
        records = compact(self.outdir)
        s = self.stats
        lat = np.asarray(s.samples, dtype=np.float64)
        processed = s.ok + s.failed
        job_ok = sum(1 for r in records.values() if r.status == "ok")
        summary: dict[str, Any] = {
            "outdir": str(self.outdir),
            "engine": engine,
            "workers": workers,
            "dataset": self.dataset.describe(),
            "resumed": self.resumed,
            "run": {
                "processed": processed, "ok": s.ok, "failed": s.failed, "skipped_done": s.skipped,
                "wall_s": round(wall, 4),
                "items_per_s": round(processed / wall, 3) if wall > 0 else None,
                "units": dict(s.units),
                "latency_ms": _latency_summary(lat, s.latency_sum, s.ok, s.latency_max),
                "failures": s.failures,
            },
            "job": {"items": s.total, "ok": job_ok, "failed": len(records) - job_ok,
                    "complete": job_ok == s.total},
            "output_format": output_format,
        }
        if output_format != "npz":
            summary["shards"] = {"size": shard_size, "written_now": shards,
                                 "files": sorted({r.file for r in records.values() if r.file and "/shard-" in r.file})}
        if extra:
            summary.update(extra)
        atomic_write_json(self.outdir / SUMMARY, summary)
        self.close()
        return summary


def _latency_summary(lat: np.ndarray, total: float, n: int, mx: float) -> dict[str, float] | None:
    if not n:
        return None
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return {"mean": round(total / n, 4), "p50": round(float(p50), 4), "p90": round(float(p90), 4),
            "p99": round(float(p99), 4), "max": round(mx, 4)}


def run_batch(factory: PredictorFactory, dataset: str | os.PathLike[str] | Dataset, outdir: str | os.PathLike[str],
              options: BatchOptions | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run (or resume) a batch job; returns the summary also written to ``OUTDIR/summary.json``."""
    options = options or BatchOptions()
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    job = Job(factory, ds, Path(outdir), progress, options.fsync_interval_s, options.restart)
    try:
        job.start()
        try:
            if options.engine == "ray":
                from bitnet_coreml.jobs.ray_engine import run_ray  # optional extra

                extra = run_ray(job, options)
            else:
                extra = _run_local(job, options)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what finished is recorded and summarised, then stop
            job.finish(options.engine, options.workers, {"interrupted": True}, options.output_format,
                       options.shard_size)
            raise
        return job.finish(options.engine, options.workers, extra, options.output_format, options.shard_size)
    finally:
        job.close()


def _run_local(job: Job, options: BatchOptions) -> dict[str, Any]:
    if options.workers == 1:
        # One worker runs in this process: no pickling or IPC per item (the overhead benchmark's case).
        predictor = job.factory()
        for ref in job.pending():
            job.record(process_item(predictor, ref, job.outdir))
        return _recovery_extra([predictor])
    _run_pool(job, options)
    return {}


def _recovery_extra(predictors: list[Any]) -> dict[str, Any]:
    stats = [p.recovery_stats() for p in predictors if hasattr(p, "recovery_stats")]
    stats = [s for s in stats if s]
    return {"recovery": stats} if stats else {}


# --- process pool ---------------------------------------------------------------------------------

_WORKER: ItemPredictor | None = None
_WORKER_ERROR: BaseException | None = None


def _init_worker(factory: PredictorFactory) -> None:
    global _WORKER, _WORKER_ERROR
    # Ctrl-C is the driver's to handle; workers finish their item and are shut down by it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("bitnet_coreml").setLevel(logging.WARNING)
    try:
        _WORKER = factory()
    except BaseException as e:  # noqa: BLE001 - reported to the driver on the first item (an initializer cannot)
        _WORKER_ERROR = e


def _work(ref: ItemRef, outdir: Path) -> ItemRecord:
    if _WORKER_ERROR is not None:
        raise _WORKER_ERROR
    assert _WORKER is not None
    return process_item(_WORKER, ref, outdir)


def _new_pool(job: Job, workers: int) -> cf.ProcessPoolExecutor:
    # spawn, not fork: the driver may hold threads (progress display, coremltools) that fork would copy mid-state.
    # Each worker gets cores // workers BLAS/OpenMP/numba threads, set before it imports numpy (_threads).
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=pool_initializer,
                                  initargs=(threads_per_worker(workers), pool_payload(_init_worker, job.factory)))


def _run_pool(job: Job, options: BatchOptions) -> None:
    limit = options.workers * options.in_flight_per_worker
    pool = _new_pool(job, options.workers)
    in_flight: dict[cf.Future[ItemRecord], ItemRef] = {}
    refs = job.pending()
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < limit:
                ref = next(refs, None)
                if ref is None:
                    exhausted = True
                    break
                in_flight[pool.submit(_work, ref, job.outdir)] = ref
            if not in_flight:
                break
            finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in finished:
                ref = in_flight.pop(fut)
                try:
                    job.record(fut.result())
                except cf.process.BrokenProcessPool:
                    broken = True
                    job.record(ItemRecord(ref.id, ref.index, "error",
                                          error="worker process died while predicting this item (or a neighbour)"))
            if broken:
                # The pool is unusable once a worker died; the items it held are recorded as failed
                # (a rerun retries them) and a fresh pool takes the rest.
                for ref in in_flight.values():
                    job.record(ItemRecord(ref.id, ref.index, "error", error="worker process died during this item"))
                in_flight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _new_pool(job, options.workers)
    finally:
        pool.shutdown(wait=not in_flight, cancel_futures=True)
