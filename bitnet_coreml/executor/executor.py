"""``ReferenceExecutor``: run an ML Program (MIL) with numpy on any OS.

The program is compiled once (see :mod:`bitnet_coreml.executor.compiler`); ``predict`` checks the
inputs against the declared names, shapes and dtypes, fills the environment and walks the steps.
Tensors the program types as fp16 hold fp16 values after every op (computed in fp32, rounded
half-to-even to fp16, overflow to inf), so fp16 overflow and rounding show up as on device; inside a
call they sit in float32 arrays (see ``_fp16``), outputs and states come back as float16.
``fp32=True`` skips the rounding for diagnosis. Only ops whose inputs change per call run per call:
constants, ``constexpr_*`` decompression and everything computable from constants run once at load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.executor import registry
from bitnet_coreml.executor._types import np_dtype, scalar_for_one, static_shape
from bitnet_coreml.executor.compiler import (
    F16,
    F32,
    CompiledBlock,
    StateCell,
    compile_function,
    plan_frees,
    run_block,
)
from bitnet_coreml.executor.errors import (
    InputDtypeError,
    InputShapeError,
    MissingInputError,
    StateError,
    UnexpectedInputError,
)
from bitnet_coreml.executor.loader import load_shared
from bitnet_coreml.executor.shared import SharedPackage
from bitnet_coreml.vocab import InputSpec

__all__ = ["ReferenceExecutor", "ExecutorState", "InputSpec", "Trace"]

log = logging.getLogger(__name__)


class Trace(NamedTuple):
    """What ``ReferenceExecutor.trace`` returns: outputs, captured op values and, when profiled, times per op family."""

    outputs: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    seconds: float
    by_family: dict[str, float]
    calls: dict[str, int]


def _timed(fn: Any, family: str, seconds: dict[str, float], calls: dict[str, int]) -> Any:
    def run(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[family] = seconds.get(family, 0.0) + time.perf_counter() - t0
            calls[family] = calls.get(family, 0) + 1

    return run


class ExecutorState:
    """The values of a stateful program's state tensors, carried across ``predict`` calls.

    Starts zero-filled. ``read_state`` / ``write_state`` mirror coremltools' ``MLState`` names and
    give / take the declared dtype. Between calls an fp16 state is held in the executor's compute
    form (its fp16 values in a float32 array), so a call neither widens the whole cache on entry nor
    narrows it on exit.
    """

    def __init__(self, specs: Mapping[str, InputSpec], owner: int) -> None:
        self._owner = owner
        self._specs = dict(specs)
        self._values = {n: np.zeros(tuple(int(d or 0) for d in s.shape), dtype=_held_dtype(s.dtype))
                        for n, s in specs.items()}

    @property
    def names(self) -> list[str]:
        return list(self._values)

    def read_state(self, name: str) -> np.ndarray:
        """A copy of state ``name`` in its declared dtype."""
        if name not in self._values:
            raise StateError(f"state {name!r} does not exist; states: {', '.join(self._values) or 'none'}")
        return self._values[name].astype(self._specs[name].dtype)

    def write_state(self, name: str, value: np.ndarray) -> None:
        """Overwrite state ``name``; shape must match, value is cast to the state's dtype."""
        if name not in self._values:
            raise StateError(f"state {name!r} does not exist; states: {', '.join(self._values) or 'none'}")
        value = np.asarray(value)
        spec = self._specs[name]
        if value.shape != spec.shape:
            raise InputShapeError(f"state {name!r}: shape {value.shape}, the package declares {spec.shape}")
        self._values[name] = value.astype(spec.dtype).astype(_held_dtype(spec.dtype))

    read = read_state
    write = write_state


def _held_dtype(dt: np.dtype) -> np.dtype:
    """How a state of dtype ``dt`` is held between calls (fp16: its values in float32)."""
    return F32 if dt == F16 else dt


class ReferenceExecutor:
    """Numpy executor for ML Programs: ``ReferenceExecutor(source, *, fp32=False).predict(inputs)``.

    ``source`` is an ``.mlpackage`` path, a coremltools ``MLModel`` (saved or straight from
    ``ct.convert``) or a MIL ``Program``. ``function_name`` picks a function of a multifunction
    package (default: the package's default function, else ``main``).

    The executors of several functions of one package share the program (read once) and every weight
    decoded from it (see ``executor/shared.py``): build them from the same package path, or with
    :meth:`function`. A state made by one of them works with all (same names and shapes), as an
    ``MLState`` does across the functions of a Core ML model.
    """

    def __init__(self, source: Any, *, fp32: bool = False, function_name: str | None = None,
                 _shared: SharedPackage | None = None) -> None:
        coremltools()
        t0 = time.perf_counter()
        pkg = _shared or load_shared(source)
        prog, where = pkg.program, pkg.where
        fn_name = function_name or pkg.default_function or "main"
        if fn_name not in prog.functions:
            raise ModelLoadError(
                f"{where}: has no function {fn_name!r}; functions: {', '.join(sorted(prog.functions))}"
            )
        func = prog.functions[fn_name]
        self.source = where
        self.function_name = fn_name
        self.fp32 = fp32
        self.program = prog
        self._shared = pkg
        with pkg.lock:
            self._block, self._n_slots, self.folded_ops = compile_function(
                func, fp32=fp32, blob_keys=pkg.keys.get(fn_name), shared=pkg.values(fp32),
                blobs=pkg.blobs)

        from coremltools.converters.mil.mil import types

        self._inputs: dict[str, InputSpec] = {}
        self._states: dict[str, InputSpec] = {}
        self._input_slots: list[tuple[str, int, bool]] = []
        for (name, var), slot in zip(func.inputs.items(), self._block.input_slots, strict=False):
            dt = np_dtype(var.dtype)
            shape = static_shape(var)
            if dt is None or shape is None:
                raise ModelLoadError(f"{where}: input {name!r} has unsupported type {var.sym_type}")
            is_state = types.is_state(var.sym_type)
            (self._states if is_state else self._inputs)[name] = InputSpec(shape, dt)
            self._input_slots.append((name, slot, is_state))
        # fp32 mode keeps fp16 states in fp32 too, so a diagnosis run has no fp16 rounding anywhere
        self._state_compute = {
            n: InputSpec(s.shape, F32 if (fp32 and s.dtype == F16) else s.dtype) for n, s in self._states.items()
        }
        self._outputs: list[str] = [v.name for v in func.outputs]
        self._output_dtypes: list[np.dtype | None] = [np_dtype(v.dtype) for v in func.outputs]
        self.load_seconds = time.perf_counter() - t0
        log.debug("loaded %s (%s) in %.3fs", where, fn_name, self.load_seconds)

    # --- description --------------------------------------------------------------------------

    @property
    def function_names(self) -> list[str]:
        """The functions of the program (one, ``main``, for a one-function package)."""
        return sorted(self.program.functions)

    def function(self, name: str) -> ReferenceExecutor:
        """An executor of function ``name`` of the same package, sharing the program and its weights."""
        return ReferenceExecutor(self.source, fp32=self.fp32, function_name=name, _shared=self._shared)

    @property
    def input_specs(self) -> dict[str, InputSpec]:
        """Input name -> (shape, dtype); None in a shape is a flexible dimension."""
        return dict(self._inputs)

    @property
    def state_specs(self) -> dict[str, InputSpec]:
        """State name -> (shape, dtype) of a stateful program (empty otherwise)."""
        return dict(self._states)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def is_stateful(self) -> bool:
        return bool(self._states)

    @property
    def num_steps(self) -> int:
        """Ops run per call (constants and load-time folded ops excluded)."""
        return len(self._block.steps)

    def make_state(self) -> ExecutorState:
        """A fresh, zero-filled state for this program."""
        return ExecutorState(self._state_compute, id(self))

    # --- prediction ---------------------------------------------------------------------------

    def _check_inputs(self, inputs: Mapping[str, Any]) -> None:
        if not isinstance(inputs, Mapping):
            raise InputShapeError(f"{self.source}: inputs must be a dict of name -> numpy array, got {type(inputs).__name__}")
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise MissingInputError(
                f"{self.source}: missing input(s) {', '.join(missing)}; the package declares {', '.join(self._inputs)}"
            )
        extra = [n for n in inputs if n not in self._inputs]
        if extra:
            raise UnexpectedInputError(
                f"{self.source}: unexpected input(s) {', '.join(map(str, extra))}; "
                f"the package declares {', '.join(self._inputs) or 'no inputs'}"
            )
        for name, spec in self._inputs.items():
            value = inputs[name]
            if not isinstance(value, np.ndarray):
                raise InputDtypeError(
                    f"{self.source}: input {name!r} is a {type(value).__name__}; give a numpy array of dtype {spec.dtype}"
                )
            if value.dtype != spec.dtype:
                raise InputDtypeError(
                    f"{self.source}: input {name!r} has dtype {value.dtype}; the package declares {spec.dtype} "
                    f"(cast with .astype(np.{spec.dtype.name}))"
                )
            ok = value.ndim == len(spec.shape) and all(d is None or d == s for d, s in zip(spec.shape, value.shape, strict=False))
            ok = ok or scalar_for_one(value.shape, spec.shape)
            if not ok:
                want = tuple("?" if d is None else d for d in spec.shape)
                raise InputShapeError(
                    f"{self.source}: input {name!r} has shape {tuple(value.shape)}; the package declares {want}"
                )

    def predict(self, inputs: Mapping[str, np.ndarray], state: ExecutorState | None = None) -> dict[str, np.ndarray]:
        """Run the program; returns output name -> array with the declared dtype (fp32 for fp16 outputs when ``fp32``)."""
        return self._outputs_of(self._run(self._block, inputs, state))

    def trace(self, inputs: Mapping[str, np.ndarray], *, capture: Collection[str] = (), profile: bool = False,
              state: ExecutorState | None = None) -> Trace:
        """``predict`` that also keeps the values of the ops named in ``capture`` and, with ``profile``, times each op.

        Runs a copy of the compiled steps (the plain ``predict`` path is untouched): captured values are
        kept alive to the end of the call, and each op's implementation is timed under its op family
        (the executor module implementing it, see ``op_families``). Time outside the implementations
        (fp16 rounding of the results, argument gathering) is ``Trace.seconds - sum(by_family)``.
        Captured values come back in compute form (fp16 values in float32 arrays).
        """
        wanted = set(capture)
        by_family: dict[str, float] = {}
        calls: dict[str, int] = {}
        steps = []
        kept: dict[str, int] = {}
        for step in self._block.steps:
            fn = step.fn
            if profile:
                fn = _timed(fn, registry.lookup(step.ctx.op_type).family, by_family, calls)
            steps.append(replace(step, fn=fn))
            if step.ctx.name in wanted and step.out_slots:
                kept[step.ctx.name] = step.out_slots[0]
        block = CompiledBlock(steps, self._block.input_slots,
                              self._block.outputs + tuple((slot, None) for slot in kept.values()))
        plan_frees(block)
        t0 = time.perf_counter()
        outs = self._run(block, inputs, state)
        seconds = time.perf_counter() - t0
        n = len(self._outputs)
        values = {name: np.asarray(v) for name, v in zip(kept, outs[n:], strict=True)}
        return Trace(self._outputs_of(outs[:n]), values, seconds, by_family, calls)

    def _run(self, block: CompiledBlock, inputs: Mapping[str, np.ndarray], state: ExecutorState | None) -> list[Any]:
        self._check_inputs(inputs)
        if self._states and state is None:
            raise StateError(f"{self.source}: the package is stateful; pass state=executor.make_state()")
        if state is not None and not self._states:
            raise StateError(f"{self.source}: the package has no state; call predict without state")
        if state is not None and sorted(state.names) != sorted(self._states):
            raise StateError(
                f"{self.source}: state holds {', '.join(state.names)}; the package declares {', '.join(self._states)}"
            )
        env: list[Any] = [None] * self._n_slots
        cells: list[StateCell] = []
        for name, slot, is_state in self._input_slots:
            if is_state:
                assert state is not None
                held = state._values[name]
                if held.dtype == F16:  # held in fp16 by the fused decode's C kernel (executor/fused.py): exact
                    held = held.astype(_held_dtype(self._state_compute[name].dtype))
                cell = StateCell(name, held, self._state_compute[name].dtype)
                cells.append(cell)
                env[slot] = cell
            else:
                value = inputs[name]
                if value.ndim == 0:  # a scalar of the source graph, declared shape [1]
                    value = value.reshape(1)
                if value.dtype == F16:  # fp16 values live in float32 arrays during a call (exact)
                    value = value.astype(F32)
                env[slot] = value
        with np.errstate(all="ignore"):
            outs = run_block(block, env)
        for cell in cells:  # the state ops never write into a held array, so a failed call changes nothing
            assert state is not None
            held_dtype = _held_dtype(self._state_compute[cell.name].dtype)
            state._values[cell.name] = cell.value.astype(held_dtype) if cell.value.dtype != held_dtype else cell.value
        return outs

    def _outputs_of(self, outs: list[Any]) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        for name, value, dt in zip(self._outputs, outs, self._output_dtypes, strict=False):
            arr = np.asarray(value)
            if dt is not None:
                if dt == F16 and self.fp32:
                    dt = F32
                if arr.dtype != dt:
                    arr = arr.astype(dt)
            result[name] = arr
        return result

    def peak_activation_bytes(self) -> int:
        """Largest total size of the op results alive at once during a call (the executor's free plan).

        Counts each per-call op result at its declared shape and dtype (fp16: 2 bytes) from the step
        that makes it to the last step that reads it; weights and load-time constants are not included.
        """
        live = peak = 0
        sizes: dict[int, int] = {}
        for step in self._block.steps:
            for slot, shape, dt in zip(step.out_slots, step.ctx.out_shapes, step.ctx.out_dtypes, strict=False):
                if shape is None or dt is None or any(d is None for d in shape):
                    continue
                sizes[slot] = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
                live += sizes[slot]
            peak = max(peak, live)
            for slot in step.frees:
                live -= sizes.pop(slot, 0)
        return peak

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}: {tuple(s.shape)} {s.dtype}" for n, s in self._inputs.items())
        return f"ReferenceExecutor({self.source!r}, fn={self.function_name!r}, inputs=[{ins}], steps={self.num_steps})"

