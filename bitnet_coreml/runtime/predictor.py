"""The Predictor: one package, a chain of compute units, classified errors, recovery and statistics.

This is the seed's ``BitNetMPSManager`` for Core ML. Per request it walks the unit chain (ordered by
the strategy, the power target and the thermal state), skips units the platform lacks, that failed
for good earlier, that the capability check rules out or that would not fit in memory, probes a Core
ML unit in a subprocess before its first in-process use, retries transient failures with exponential
backoff, validates a unit's first outputs against the CPU reference, and falls back to the next unit.
Units are loaded once and kept; after the first probe a request costs no subprocess and no reload.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from bitnet_coreml.errors import (
    ANEUnavailableError,
    BitnetCoremlError,
    CapabilityMismatchError,
    ConfigError,
    DeviceInitError,
    ExhaustedError,
    InternalError,
    ModelError,
    PlatformUnavailableError,
    TimeoutFailure,
)
from bitnet_coreml.runtime._worker import Worker
from bitnet_coreml.runtime.capability import capability_verdicts, validate_requirements
from bitnet_coreml.runtime.monitor import Monitor, PlatformSnapshot
from bitnet_coreml.runtime.package_io import PackageInfo, read_package, validate_inputs
from bitnet_coreml.runtime.probe import ProbeResult, run_probe
from bitnet_coreml.runtime.recovery import RecoveryAction, backoff_delay, classify_exception, handle_error
from bitnet_coreml.runtime.result import Attempt, PredictionResult
from bitnet_coreml.runtime.stats import ErrorRecovery
from bitnet_coreml.runtime.strategy import ComputeUnit, FallbackStrategy, PowerTarget, order_for_power
from bitnet_coreml.runtime.units import ReferenceUnit, Unit, make_units

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which a unit is not tried again by this predictor: they describe the unit or the
# platform, not the request. A hung unit's worker thread is still stuck, so it is out for good too.
_PERMANENT = (PlatformUnavailableError, ANEUnavailableError, CapabilityMismatchError, DeviceInitError,
              ModelError, TimeoutFailure)


# Probe results shared by every predictor in this process (batch jobs run one predictor per worker
# thread): a package + unit is probed once per process, not once per predictor. Keyed by the package's
# path and the size and mtime of its model and weight files (not Manifest.json: coremltools rewrites it
# on every open), so a rewritten package is probed again.
_ProbeKey = tuple[str, tuple[tuple[str, int, int], ...], tuple[str, ...], tuple[str, ...]]
_PROBE_CACHE: dict[_ProbeKey, ProbeResult] = {}
_PROBE_LOCKS: dict[_ProbeKey, threading.Lock] = {}
_PROBE_LOCK = threading.Lock()


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = max(float(np.linalg.norm(b64)), 1e-12)
    return float(np.linalg.norm(a64 - b64) / denom)


class Predictor:
    """Predict with compute-unit fallback. One instance per worker; thread safe for stats, not for calls.

    ``units`` overrides the strategy's chain with unit names and/or :class:`Unit` objects (e.g. several
    :class:`ReferenceUnit` instances, or units wrapped by a caller). ``monitor`` is the platform
    reader the predictor adapts to (default: a :class:`Monitor` refreshed every
    ``strategy.monitor_interval_s``).
    """

    def __init__(self, package: str | os.PathLike[str], strategy: FallbackStrategy | None = None, *,
                 units: Sequence[str | ComputeUnit | Unit] | None = None, monitor: Monitor | None = None) -> None:
        self.strategy = strategy or FallbackStrategy()
        self.info: PackageInfo = read_package(package)
        s = self.strategy
        self.units: list[Unit] = make_units(s.enabled_units() if units is None else units,
                                            probe_coreml=s.probe_coreml_units)
        names = [u.name for u in self.units]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"unit names must be unique and the chain non-empty, got {names}")
        self._recovery = ErrorRecovery(recent_error_window_s=s.recent_error_window_s, latency_window=s.latency_window)
        self._monitor = monitor if monitor is not None else Monitor(s.monitor_interval_s)
        self._failed: dict[str, BitnetCoremlError] = {}
        self._probes: dict[str, ProbeResult] = {}
        self._validated: set[str] = set()
        self._workers: dict[str, Worker] = {}
        self._oracle: ReferenceUnit | None = None
        self._verdicts: dict[str, str] | None = None
        # Idle worker threads would outlive a predictor that is dropped without close().
        weakref.finalize(self, _stop_workers, self._workers)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the seed's manager API ------------------------------------------------------------------

    def error_recovery(self) -> ErrorRecovery:
        """The recovery manager: ``handle_error`` and ``get_recovery_stats()``."""
        return self._recovery

    def get_recovery_stats(self) -> Any:
        return self._recovery.get_recovery_stats()

    def system_info(self) -> dict[str, Any]:
        """Platform, package, strategy and every unit's state (availability, probe, failure)."""
        plat = self._monitor.reading(force=True)
        units = []
        for u in self.units:
            why = u.unavailable(plat, self.info)
            d = u.describe()
            d["available"] = why is None
            d["unavailable_reason"] = why.one_line() if why else None
            d["failed"] = self._failed[u.name].one_line() if u.name in self._failed else None
            d["probe"] = self._probes[u.name].to_dict() if u.name in self._probes else None
            units.append(d)
        return {
            "platform": plat.to_dict(),
            "package": {"path": str(self.info.path), "inputs": {n: {"shape": list(i.shape), "dtype": str(i.dtype)}
                                                                for n, i in self.info.inputs.items()},
                        "outputs": list(self.info.output_names), "weight_bytes": self.info.weight_bytes},
            "strategy": self.strategy.to_dict(),
            "units": units,
        }

    def is_ane_available(self) -> bool:
        """True if an ANE unit in the chain can run here and has not failed."""
        plat = self._monitor.platform
        return any(u.kind is ComputeUnit.ANE and u.unavailable(plat, self.info) is None and u.name not in self._failed
                   for u in self.units)

    def validate_operation_requirements(self, requirements: Any) -> None:
        """Raise :class:`CapabilityMismatchError` listing every requirement this machine misses."""
        validate_requirements(requirements, self._monitor.reading(force=True))

    def execute_with_recovery(self, name: str, fn: Callable[[], T], *, fallback: Callable[[], T] | None = None) -> T:
        """Run ``fn`` with the strategy's retries; on fallback-class errors run ``fallback`` (if given).

        Statistics are kept under ``operations[name]``. Raises the classified error for bad input
        (give up) and :class:`ExhaustedError` when neither ``fn`` nor ``fallback`` succeeded.
        """
        rec, s = self._recovery, self.strategy
        retries = 0
        history: list[dict[str, object]] = []
        while True:
            rec.record_attempt(name, operation=True)
            t0 = time.perf_counter()
            try:
                value = fn()
            except Exception as e:
                err = classify_exception(e, context=name)
                rec.record_failure(name, err, operation=True)
                action = handle_error(err)
                history.append({"operation": name, "error_type": type(err).__name__, "error": err.one_line(),
                                "action": action.value})
                if action is RecoveryAction.GIVE_UP:
                    raise err from (e if err is not e else None)
                if action is not RecoveryAction.FALLBACK and retries < s.max_retry_attempts:
                    self._before_retry(action, retries, None)
                    rec.record_retry(name, operation=True)
                    retries += 1
                    continue
                if fallback is not None and s.enable_cpu_fallback:
                    rec.record_fallback(name, operation=True)
                    key = f"{name}:fallback"
                    rec.record_attempt(key, operation=True)
                    t1 = time.perf_counter()
                    try:
                        value = fallback()
                    except Exception as e2:
                        err2 = classify_exception(e2, context=f"{name} fallback")
                        rec.record_failure(key, err2, operation=True)
                        history.append({"operation": key, "error_type": type(err2).__name__, "error": err2.one_line()})
                        raise ExhaustedError(f"operation {name}: failed ({err.one_line()}) and its fallback failed "
                                             f"({err2.one_line()})", history) from e2
                    rec.record_success(key, time.perf_counter() - t1, operation=True)
                    return value
                raise ExhaustedError(f"operation {name} failed after {retries} retr{'y' if retries == 1 else 'ies'}: "
                                     f"{err.one_line()}", history) from e
            rec.record_success(name, time.perf_counter() - t0, operation=True)
            return value

    # --- prediction ------------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any], *, source: str = "inputs") -> PredictionResult:
        """Answer one request from the first unit that can; raise :class:`ExhaustedError` if none can.

        ``source`` names the inputs in error messages (e.g. the .npz file they came from).
        """
        t_start = time.perf_counter()
        s, rec = self.strategy, self._recovery
        rec.record_request()
        try:
            x = validate_inputs(self.info, inputs, source=source)
        except BitnetCoremlError:
            rec.record_rejected()
            raise
        plat = self._monitor.reading() if s.monitor_fallback_performance else self._monitor.platform
        order, power_reason, notes = self._plan(plat)
        attempts: list[Attempt] = []
        first_failure_at: float | None = None
        batch_size = _leading_batch(x)
        for pos, unit in enumerate(order):
            later = order[pos + 1:]
            why, pressure = self._skip_reason(unit, plat, later, notes)
            if why is not None:
                rec.record_skip(unit.name)
                attempts.append(Attempt(unit.name, "skipped", why))
                continue
            chunk = self._free_memory(unit, x, batch_size, notes, "running") if pressure else batch_size
            try:
                self._prepare(unit)
            except Exception as e:  # noqa: BLE001 - classify_exception decides: a bug becomes InternalError, never retried
                failed_at = time.perf_counter()
                err = classify_exception(e, context=unit.name)
                if handle_error(err) is RecoveryAction.GIVE_UP:
                    rec.record_rejected()
                    _log_bug(unit.name, err)
                    raise err from (e if err is not e else None)
                rec.record_failure(unit.name, err)
                rec.record_fallback(unit.name)
                self._fail(unit, err)
                attempts.append(Attempt(unit.name, "failed", err.one_line(), type(err).__name__,
                                        RecoveryAction.FALLBACK.value))
                log.info("%s could not be prepared (%s: %s); falling back", unit.name, type(err).__name__,
                         err.one_line())
                first_failure_at = first_failure_at or failed_at
                continue
            answered = self._run_unit(unit, x, attempts, notes, chunk)
            if isinstance(answered, float):  # the moment the unit's last attempt failed
                first_failure_at = first_failure_at or answered
                continue
            outputs, call_s, used_batch = answered
            rec.record_outcome(True)
            end = time.perf_counter()
            overhead = None if first_failure_at is None else max(0.0, end - first_failure_at - call_s)
            return PredictionResult(
                outputs=outputs, unit=unit.name, attempts=tuple(attempts), chain=tuple(u.name for u in order),
                power_target=s.power_target.value, power_reason=power_reason, latency_s=end - t_start,
                unit_latency_s=call_s, fallback_overhead_s=overhead, notes=tuple(notes), batch_size=used_batch)
        rec.record_outcome(False)
        summary = "; ".join(a.reason if a.reason.startswith(f"{a.unit}") else f"{a.unit}: {a.reason}"
                            for a in attempts if a.outcome != "retried")
        raise ExhaustedError(f"{self.info.path.name}: no compute unit answered ({summary})",
                             [a.to_dict() for a in attempts])

    # --- planning --------------------------------------------------------------------------------

    def _plan(self, plat: PlatformSnapshot) -> tuple[list[Unit], str, list[str]]:
        s = self.strategy
        kinds = [u.kind for u in self.units]
        notes: list[str] = []
        target = s.power_target
        bandwidth = self.info.weight_bytes >= s.bandwidth_bound_weight_bytes
        if plat.hot and target is not PowerTarget.EFFICIENCY:
            notes.append(f"thermal state {plat.thermal_state}: using the efficiency order (ANE first, GPU last) "
                         f"instead of {target.value}")
            target = PowerTarget.EFFICIENCY
        idx, reason = order_for_power(kinds, target, bandwidth_bound=bandwidth)
        return [self.units[i] for i in idx], reason, notes

    def _skip_reason(self, unit: Unit, plat: PlatformSnapshot, later: Sequence[Unit],
                     notes: list[str]) -> tuple[str | None, bool]:
        """(why to skip ``unit`` or None, whether it runs under memory pressure)."""
        if unit.name in self._failed:
            return f"failed earlier: {self._failed[unit.name].one_line()}", False
        why = unit.unavailable(plat, self.info)
        if why is not None:
            self._failed[unit.name] = why
            return why.one_line(), False
        verdict = self._capability().get(unit.kind.value)
        if verdict is not None:
            self._failed[unit.name] = CapabilityMismatchError(f"{unit.name}: {verdict}", [verdict])
            return f"capability check: {verdict}", False
        need, avail = unit.memory_need(self.info), plat.memory_available_bytes
        if avail is not None and need > avail:
            msg = f"memory pressure: loading {unit.name} needs ~{need / 2**20:.1f} MiB, {avail / 2**20:.1f} MiB available"
            if later:
                notes.append(f"{msg}; moved on to a unit that costs less")
                return msg, False
            notes.append(f"{msg}; trying it anyway as the last unit in the chain")
            return None, True
        return None, False

    def _capability(self) -> dict[str, str]:
        if self._verdicts is None:
            self._verdicts = capability_verdicts(self.info)
        return self._verdicts

    def _prepare(self, unit: Unit) -> None:
        """Probe (once, in a subprocess) and load (once) a unit."""
        if unit.needs_probe and unit.name not in self._probes:
            res = self._probe(unit)
            self._probes[unit.name] = res
            if not res.ok:
                assert res.error is not None
                raise res.error
        unit.load(self.info)

    def _probe(self, unit: Unit) -> ProbeResult:
        entry, args = tuple(unit.probe_entry()), tuple(unit.probe_args())
        root = self.info.path / "Data"
        files = tuple(sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                             for f in root.rglob("*") if f.is_file()))
        key: _ProbeKey = (str(self.info.path.resolve()), files, entry, args)
        with _PROBE_LOCK:
            key_lock = _PROBE_LOCKS.setdefault(key, threading.Lock())
        with key_lock:  # concurrent predictors wait for one probe of the same package + unit
            cached = _PROBE_CACHE.get(key)
            if cached is None:
                cached = _PROBE_CACHE[key] = run_probe(self.info.path, unit.name, args, entry=entry,
                                                       timeout_s=self.strategy.probe_timeout_s)
        return cached

    def _fail(self, unit: Unit, err: BitnetCoremlError) -> None:
        if isinstance(err, _PERMANENT):
            self._failed[unit.name] = err
            if isinstance(err, TimeoutFailure):
                worker = self._workers.pop(unit.name, None)
                if worker is not None:
                    worker.stop()

    # --- one unit, with retries ------------------------------------------------------------------

    def _run_unit(self, unit: Unit, x: dict[str, np.ndarray], attempts: list[Attempt], notes: list[str],
                  batch: int | None) -> tuple[dict[str, np.ndarray], float, int | None] | float:
        """The answer, its call time and batch size; or, if the unit gave up, the time it last failed."""
        s, rec = self.strategy, self._recovery
        retries = 0
        delay = planned = 0.0
        chunk = batch
        while True:
            rec.record_attempt(unit.name)
            t0 = time.perf_counter()
            try:
                outputs = self._call_chunked(unit, x, chunk)
                self._check_outputs(unit, x, outputs, notes)
            except Exception as e:  # noqa: BLE001 - classify_exception decides: a bug becomes InternalError, never retried
                failed_at = time.perf_counter()
                call_s = failed_at - t0
                err = classify_exception(e, context=unit.name)
                rec.record_failure(unit.name, err)
                action = handle_error(err)
                if action is RecoveryAction.GIVE_UP:
                    rec.record_rejected()
                    _log_bug(unit.name, err)
                    raise err from (e if err is not e else None)
                if action is not RecoveryAction.FALLBACK and retries < s.max_retry_attempts:
                    attempts.append(Attempt(unit.name, "retried", err.one_line(), type(err).__name__, action.value,
                                            call_s, delay, planned))
                    if action is RecoveryAction.REDUCE_MEMORY:
                        chunk = self._free_memory(unit, x, chunk, notes, "retrying")
                    log.info("%s: %s (%s); %s, retry %d of %d", unit.name, type(err).__name__, err.one_line(),
                             action.value, retries + 1, s.max_retry_attempts)
                    planned, delay = self._before_retry(action, retries, notes)
                    rec.record_retry(unit.name)
                    retries += 1
                    continue
                rec.record_fallback(unit.name)
                self._fail(unit, err)
                reason = err.one_line() if action is RecoveryAction.FALLBACK else \
                    f"{err.one_line()} (gave up after {retries} retr{'y' if retries == 1 else 'ies'})"
                attempts.append(Attempt(unit.name, "failed", reason, type(err).__name__, RecoveryAction.FALLBACK.value,
                                        call_s, delay, planned))
                log.info("%s failed (%s: %s); falling back", unit.name, type(err).__name__, reason)
                return failed_at
            call_s = time.perf_counter() - t0
            if s.monitor_fallback_performance:
                rec.record_success(unit.name, call_s)
            else:
                rec.record_success(unit.name, 0.0)
            attempts.append(Attempt(unit.name, "answered", "ok", seconds=call_s, delay_s=delay, planned_delay_s=planned))
            return outputs, call_s, chunk

    def _call(self, unit: Unit, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timeout = self.strategy.unit_timeout_s
        if timeout is None:
            return unit.predict(x)
        worker = self._workers.get(unit.name)
        if worker is None:
            worker = self._workers[unit.name] = Worker(unit.name)
        finished, out = worker.call(timeout, unit.predict, x)
        if not finished:
            raise TimeoutFailure(f"{unit.name}: no answer within {timeout:g} s (unit_timeout_s); the unit is abandoned")
        return out  # type: ignore[no-any-return]

    def _call_chunked(self, unit: Unit, x: dict[str, np.ndarray], chunk: int | None) -> dict[str, np.ndarray]:
        batch = _leading_batch(x)
        if chunk is None or batch is None or chunk >= batch:
            return self._call(unit, x)
        parts = [self._call(unit, {k: v[i:i + chunk] for k, v in x.items()}) for i in range(0, batch, chunk)]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def _check_outputs(self, unit: Unit, x: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                       notes: list[str]) -> None:
        missing = [n for n in self.info.output_names if n not in outputs]
        if missing:
            raise ModelError(f"{unit.name}: outputs {', '.join(missing)} missing from the answer")
        for name, v in outputs.items():
            if v.dtype.kind in "fc" and not np.isfinite(v).all():
                raise ModelError(f"{unit.name}: output {name!r} contains NaN/infinite values for finite inputs")
        if self.strategy.validate_first_use and unit.validate and unit.name not in self._validated:
            try:
                ref = self._oracle_unit().predict(x)
            except Exception as e:  # the oracle's failure says nothing about this unit: do not blame it
                if isinstance(classify_exception(e), InternalError):
                    raise  # but a bug in the reference is a bug, not a reason to skip validation
                self._validated.add(unit.name)
                msg = f"{unit.name}: not validated: the CPU reference failed ({type(e).__name__}: {e})"
                log.warning("%s", msg)
                notes.append(" ".join(msg.split()))
                return
            tol = self.strategy.validation_max_rel_l2
            for name in self.info.output_names:
                if outputs[name].shape != ref[name].shape:
                    raise ModelError(f"{unit.name}: output {name!r} has shape {list(outputs[name].shape)}, "
                                     f"the CPU reference gives {list(ref[name].shape)}")
                err = _rel_l2(outputs[name], ref[name])
                if not err <= tol:
                    raise ModelError(f"{unit.name}: output {name!r} differs from the CPU reference on first use: "
                                     f"relative L2 {err:.3g} > {tol:g} (validation_max_rel_l2)")
            self._validated.add(unit.name)

    def _oracle_unit(self) -> ReferenceUnit:
        """The CPU reference that validates other units: the chain's unvalidated reference unit, or a private one."""
        if self._oracle is None:
            for u in self.units:
                if isinstance(u, ReferenceUnit) and not u.validate and u.name not in self._failed:
                    self._oracle = u
                    break
            else:
                self._oracle = ReferenceUnit("cpu-reference")
        self._oracle.load(self.info)
        return self._oracle

    # --- recovery actions ------------------------------------------------------------------------

    def _before_retry(self, action: RecoveryAction, retry_index: int, notes: list[str] | None) -> tuple[float, float]:
        """Wait as ``action`` requires; return (planned, measured) seconds."""
        s = self.strategy
        t0 = time.perf_counter()
        if action is RecoveryAction.WAIT_THERMAL:
            planned = s.thermal_wait_s
            deadline = t0 + planned
            while time.perf_counter() < deadline:
                if not self._monitor.reading(force=True).hot:
                    break
                time.sleep(min(0.25, max(0.0, deadline - time.perf_counter())))
            if notes is not None:
                notes.append(f"thermal: waited {time.perf_counter() - t0:.2f} s (up to {planned:g} s) before retrying")
        else:
            planned = backoff_delay(retry_index, base_s=s.retry_delay_s, factor=s.backoff_factor,
                                    cap_s=s.max_retry_delay_s)
            if planned > 0:
                time.sleep(planned)
        return planned, time.perf_counter() - t0

    def _free_memory(self, unit: Unit, x: dict[str, np.ndarray], chunk: int | None, notes: list[str],
                     when: str) -> int | None:
        """Unload every other unit, collect garbage, and halve the batch when the model allows it."""
        freed = [u.name for u in self.units if u is not unit and u is not self._oracle and u.loaded]
        for u in self.units:
            if u.name in freed:
                u.unload()
        gc.collect()
        batch = _leading_batch(x)
        current = chunk or batch
        new = current // 2 if current else None
        # Every chunk must be a shape the model accepts: the full ones and the remainder.
        sizes = {new, batch % new} - {0} if new and batch else set()
        if new and sizes and all(spec.shape_ok((k, *x[n].shape[1:]))
                                 for k in sizes for n, spec in self.info.inputs.items()):
            notes.append(f"memory: lowered batch size {current} -> {new} on {unit.name}"
                         + (f"; unloaded {', '.join(freed)}" if freed else ""))
            return new
        notes.append(f"memory: freed memory before {when} {unit.name}"
                     + (f" (unloaded {', '.join(freed)})" if freed else "")
                     + ("; batch size cannot be lowered: the model's input shapes are fixed" if batch else ""))
        return chunk

    def close(self) -> None:
        """Stop the worker threads and unload every unit."""
        _stop_workers(self._workers)
        for u in self.units:
            u.unload()


def _log_bug(unit: str, err: BitnetCoremlError) -> None:
    """A bug is not retried: keep its traceback in the log (the CLI prints it with ``--debug``)."""
    if isinstance(err, InternalError):
        log.debug("%s: %s; not retried, no fallback", unit, err.one_line(), exc_info=err.original)


def _stop_workers(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        w.stop()
    workers.clear()


def _leading_batch(x: Mapping[str, np.ndarray]) -> int | None:
    """The shared leading dimension of all inputs, if they have one > 1."""
    dims = {v.shape[0] if v.ndim else None for v in x.values()}
    if len(dims) == 1:
        (d,) = dims
        if d is not None and d > 1:
            return int(d)
    return None

