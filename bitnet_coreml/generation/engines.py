"""One compute unit's view of a stateful package: its ``prefill`` / ``decode`` functions and a KV state.

An engine is what a :class:`~bitnet_coreml.generation.session.GenerationSession` drives: ``call``
runs one function on ``input_ids`` int32 ``[1, S]`` at ``position`` (int32 ``[1]``) against the
engine's own state and returns the logits as float32 ``[S', V]``. A new engine starts with a zero
state; the session rebuilds it by replaying the calls made so far.

* :class:`ReferenceEngine`: the reference executor (any OS). With ``decode_engine="auto"`` (or
  ``"stored"``) and a package carrying a stored decode table (``executor/fused_store.py``, written by
  ``convert --stateful``): the fused kernel runs that table, with neither coremltools nor the MIL
  program loaded, and a prefill call is fed as decode steps (the logits after its last id; padding
  is never computed). Otherwise one executor per function sharing the program, the decoded weights and the
  state (``executor/shared.py``); ``decode`` runs through the fused kernel (``executor/fused.py``)
  when the function translates (``"auto"``, ``"fused"``; ``"fused"`` refuses a package it cannot
  fuse), or always through the interpreter (``"interpreter"``). ``"stored"`` refuses a package
  without a usable stored table. ``decode_note`` says why the interpreter ran, or which fused kernel
  (C or numba, ``executor/fused.kernel``) ran and why.
* :class:`CoreMLEngine`: Core ML on macOS, one ``MLModel`` per function for the unit's
  ``compute_units`` and one ``MLState`` (``make_state``) that both functions update.

:func:`open_engine` picks the engine for a unit; a session takes another opener as its
``open_engine`` argument (the tests wrap engines with faulty ones that way).
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitnet_coreml.errors import DeviceInitError, InputError, ModelError
from bitnet_coreml.package.stateful import DECODE, PREFILL
from bitnet_coreml.runtime.strategy import ComputeUnit

if TYPE_CHECKING:
    from bitnet_coreml.runtime.units import Unit

INPUT_IDS, POSITION, LOGITS = "input_ids", "position", "logits"


DECODE_ENGINES = ("auto", "stored", "fused", "interpreter")


class Engine(abc.ABC):
    """Base: a loaded unit with a state."""

    name: str
    # what runs the decode calls ("stored" / "fused" / "interpreter" on the reference unit, None elsewhere) and why
    decode_engine: str | None = None
    decode_note: str | None = None
    # False: a prefill call takes fewer than P ids (the session does not pad a last partial chunk; an engine
    # wrapping another forwards the inner one's value, as it does decode_engine)
    pads_prefill: bool = True

    def call(self, function: str, ids: np.ndarray, position: int) -> np.ndarray:
        out = self._predict(function, {INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int32).reshape(1, -1),
                                       POSITION: np.array([position], dtype=np.int32)})
        if LOGITS in out:
            logits = out[LOGITS]
        elif len(out) == 1:
            logits = next(iter(out.values()))
        else:
            raise ModelError(f"{self.name}: {function} returned {sorted(out)}, expected an output named {LOGITS!r}")
        arr = np.asarray(logits, dtype=np.float32)
        return arr.reshape(-1, arr.shape[-1])

    @abc.abstractmethod
    def _predict(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Run one call of ``function`` on this engine's unit and return its outputs."""


class ReferenceEngine(Engine):
    """The reference executor running both functions on one :class:`ExecutorState`."""

    def __init__(self, package: str | os.PathLike[str], name: str = "reference", *, fp32: bool = False,
                 decode_engine: str = "auto") -> None:
        if decode_engine not in DECODE_ENGINES:
            raise InputError(f"decode engine {decode_engine!r}; allowed: {', '.join(DECODE_ENGINES)}")
        self.name = name
        stored_note = None
        if decode_engine in ("auto", "stored"):
            stored_note = self._open_stored(package, fp32)
            if stored_note is None:
                return
            if decode_engine == "stored":
                raise InputError(f"{package}: {stored_note}; convert the checkpoint again with "
                                 "`bitnet-coreml convert ... --stateful`, or use --engine auto")
        self._open_program(package, fp32, decode_engine, stored_note)

    def _open_stored(self, package: str | os.PathLike[str], fp32: bool) -> str | None:
        """Run the package's stored decode table; returns None when it does, else why not."""
        from bitnet_coreml.executor.fused_store import StaleTable, open_table
        from bitnet_coreml.package.chunked import is_chunked

        if is_chunked(package):
            return "no stored table (a chunked model folder)"
        try:
            table = open_table(package)
            if table is None:
                return "no stored decode table in the package"
            if fp32 and not table.header["decode"]["fp32"]:
                return "stored table refused: it runs the fp16 arithmetic, fp32 was asked for"
            decode, states = table.load()
        except StaleTable as e:
            return f"stored table refused: {e}"
        self._state = _TableState(states, decode.state_dtype)
        self._fns: dict[str, Any] = {DECODE: decode, PREFILL: _PrefillByDecode(decode)}
        self.decode_engine = "stored"
        self.decode_note = f"the package's stored table on the {decode.kernel_note}; prefill as decode steps"
        self.pads_prefill = False
        return None

    def _open_program(self, package: str | os.PathLike[str], fp32: bool, decode_engine: str,
                      stored_note: str | None) -> None:
        from bitnet_coreml.executor.chunked import open_executor

        decode = open_executor(package, fp32=fp32, function_name=DECODE)  # a package or a chunked model folder
        self._fns = {DECODE: decode, PREFILL: decode.function(PREFILL)}
        self._state = decode.make_state()
        self.decode_engine, self.decode_note = "interpreter", None
        if decode_engine != "interpreter":
            from bitnet_coreml.executor.fused import fuse

            fused, why = fuse(decode) if hasattr(decode, "_block") else (None, "a chunked model folder")
            if fused is not None:
                self._fns[DECODE] = fused
                self.decode_engine = "fused"
                self.decode_note = fused.kernel_note + (f"; translated at load ({stored_note})" if stored_note else "")
            elif decode_engine == "fused":
                raise InputError(f"{package}: the fused decode path cannot run this package ({why}); "
                                 "use the interpreter (--engine interpreter)")
            else:
                self.decode_note = f"not fused: {why}"
        else:
            self.decode_note = "interpreter asked for"

    def _predict(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return self._fns[function].predict(inputs, state=self._state)


class _TableState:
    """The KV state of a stored table's decode function, zero-filled, held in the dtype its kernel reads
    (``FusedFunction.state_dtype``: fp16 on the C kernel, float32 on numba's; ``FusedFunction`` reads and
    writes ``_values``). Zero pages stay unallocated until the cache is written there."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], dtype: Any) -> None:
        self._values = {name: np.zeros(shape, dtype=dtype) for name, shape in shapes}


class _PrefillByDecode:
    """A ``prefill`` call run as one ``decode`` call per id (positions ``position + i``); returns the logits
    after the last id, ``[1, 1, V]`` (the session reads no other row: the stored engine is never padded)."""

    def __init__(self, decode: Any) -> None:
        self._decode = decode

    def predict(self, inputs: dict[str, np.ndarray], state: Any) -> dict[str, np.ndarray]:
        ids = np.asarray(inputs[INPUT_IDS]).reshape(-1)
        pos = int(np.asarray(inputs[POSITION]).reshape(-1)[0])
        out: dict[str, np.ndarray] = {}
        for i, t in enumerate(ids.tolist()):
            out = self._decode.predict({INPUT_IDS: np.array([[t]], np.int32), POSITION: np.array([pos + i], np.int32)},
                                       state)
        return out


class CoreMLEngine(Engine):  # pragma: no cover - needs Core ML (macOS); tests/runtime/test_macos.py
    """Core ML for one compute unit: a model per function, one ``MLState`` shared by both. A chunked model folder
    (``package/chunked.py``): that per piece, the pieces called in order with the boundary tensors between them."""

    def __init__(self, package: str | os.PathLike[str], kind: ComputeUnit) -> None:
        from bitnet_coreml._quiet import coremltools
        from bitnet_coreml.package.chunked import is_chunked, open_chunked

        ct = coremltools()
        self.name = kind.value
        cu = getattr(ct.ComputeUnit, kind.coreml_name or "CPU_ONLY")
        if is_chunked(package):
            cm = open_chunked(package)
            pieces = [(p, e) for p, e in zip(cm.pieces, cm.manifest["pieces"], strict=True)]
        else:
            pieces = [(Path(package), None)]
        self._pieces: list[tuple[dict[str, Any], Any, dict[str, list[str]] | None]] = []
        try:
            for path, entry in pieces:
                fns = {fn: ct.models.MLModel(str(path), compute_units=cu, function_name=fn) for fn in (DECODE, PREFILL)}
                state = fns[DECODE].make_state() if entry is None or entry["states"] else None
                names = None if entry is None else {fn: [x["name"] for x in entry["functions"][fn]["inputs"]]
                                                   for fn in (DECODE, PREFILL)}
                self._pieces.append((fns, state, names))
        except Exception as e:  # Core ML raises bare Exceptions on compile/load failures
            raise DeviceInitError(f"{self.name}: loading {Path(package).name} with {kind.coreml_name} failed: "
                                  f"{type(e).__name__}: {' '.join(str(e).split())}") from e

    def _predict(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        values: dict[str, Any] = dict(inputs)
        out: dict[str, Any] = {}
        for fns, state, names in self._pieces:
            feed = values if names is None else {n: values[n] for n in names[function]}
            out = dict(fns[function].predict(feed, state=state) if state is not None else fns[function].predict(feed))
            values.update(out)
        return out


def open_engine(unit: Unit, package: str | os.PathLike[str], *, fp32: bool = False,
                decode_engine: str = "auto") -> Engine:
    """The engine that runs ``package`` on ``unit``: the reference executor (its decode calls fused or
    interpreted, see :class:`ReferenceEngine`) or Core ML for its compute unit."""
    from bitnet_coreml.runtime.units import ReferenceUnit

    if isinstance(unit, ReferenceUnit):
        return ReferenceEngine(package, unit.name, fp32=fp32 or unit.fp32, decode_engine=decode_engine)
    return CoreMLEngine(package, unit.kind)  # pragma: no cover - macOS only

def unavailable_reason(package: str | os.PathLike[str], unit: Unit) -> str | None:
    """Why runtime ``unit`` cannot run ``package`` on this machine (e.g. Core ML off macOS), or None."""
    from bitnet_coreml.runtime.monitor import read_platform
    from bitnet_coreml.runtime.package_io import PackageInfo

    err = unit.unavailable(read_platform(), PackageInfo(Path(package), {}, (), 0, 0))
    return err.one_line() if err is not None else None
