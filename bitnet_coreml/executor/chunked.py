"""The reference executor over a chunked model folder (``convert --chunks``): the pieces run in order.

:class:`ChunkedExecutor` has the interface of :class:`~bitnet_coreml.executor.ReferenceExecutor`
(``predict``, ``input_specs``, ``output_names``, ``function``, ``make_state``, ...): a call runs piece 0 on the
model's inputs it declares, hands each boundary tensor (``hidden_states_<i>``, fp16 as the piece returns it) to
the next piece together with the model inputs that piece declares (``position`` of a stateful model), and
returns the last piece's outputs. A stateful model's state is one :class:`ChunkedState`: each piece's own
``ExecutorState`` (the KV cache of its layers), read and written by name as one.
:func:`open_executor` gives a ``ReferenceExecutor`` for a package and a ``ChunkedExecutor`` for a folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.executor.errors import StateError
from bitnet_coreml.executor.executor import ExecutorState, InputSpec, ReferenceExecutor, Trace

__all__ = ["ChunkedExecutor", "ChunkedState", "open_executor"]


def open_executor(source: Any, *, fp32: bool = False, function_name: str | None = None) -> Any:
    """A :class:`ChunkedExecutor` for a chunked model folder, else a :class:`ReferenceExecutor`."""
    from bitnet_coreml.package.chunked import is_chunked

    if isinstance(source, (str, os.PathLike)) and is_chunked(source):
        return ChunkedExecutor(source, fp32=fp32, function_name=function_name)
    return ReferenceExecutor(source, fp32=fp32, function_name=function_name)


class ChunkedState:
    """The state of a chunked model: one ``ExecutorState`` per piece, addressed by state name."""

    def __init__(self, states: list[ExecutorState]) -> None:
        self.pieces = states
        self._where = {n: k for k, s in enumerate(states) for n in s.names}

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def _piece(self, name: str) -> ExecutorState:
        if name not in self._where:
            raise StateError(f"state {name!r} does not exist; states: {', '.join(self._where) or 'none'}")
        return self.pieces[self._where[name]]

    def read_state(self, name: str) -> np.ndarray:
        return self._piece(name).read_state(name)

    def write_state(self, name: str, value: np.ndarray) -> None:
        self._piece(name).write_state(name, value)

    read = read_state
    write = write_state


class ChunkedExecutor:
    """``ChunkedExecutor(folder).predict(inputs)``: the pieces of a chunked model chained (module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], *, fp32: bool = False, function_name: str | None = None,
                 _pieces: list[ReferenceExecutor] | None = None, _model: Any = None) -> None:
        from bitnet_coreml.package.chunked import open_chunked

        self.model = _model or open_chunked(folder)
        self.source = str(Path(folder))
        self.fp32 = fp32
        self.function_name = function_name or self.model.default_function
        if self.function_name not in self.model.functions:
            from bitnet_coreml.errors import ModelLoadError

            raise ModelLoadError(f"{folder}: has no function {self.function_name!r}; functions: "
                                 f"{', '.join(self.model.functions)}")
        self.pieces = _pieces or [ReferenceExecutor(str(p), fp32=fp32, function_name=self.function_name)
                                  for p in self.model.pieces]
        self._boundaries = {b["name"] for b in self.model.boundaries}
        self.load_seconds = sum(p.load_seconds for p in self.pieces)

    # --- description --------------------------------------------------------------------------

    @property
    def function_names(self) -> list[str]:
        return sorted(self.model.functions)

    def function(self, name: str) -> ChunkedExecutor:
        """The executor of function ``name``, sharing every piece's program and weights."""
        return ChunkedExecutor(self.source, fp32=self.fp32, function_name=name,
                               _pieces=[p.function(name) for p in self.pieces], _model=self.model)

    @property
    def input_specs(self) -> dict[str, InputSpec]:
        specs: dict[str, InputSpec] = {}
        for p in self.pieces:
            for n, s in p.input_specs.items():
                if n not in self._boundaries:
                    specs.setdefault(n, s)
        return specs

    @property
    def state_specs(self) -> dict[str, InputSpec]:
        return {n: s for p in self.pieces for n, s in p.state_specs.items()}

    @property
    def output_names(self) -> list[str]:
        return self.pieces[-1].output_names

    @property
    def is_stateful(self) -> bool:
        return any(p.is_stateful for p in self.pieces)

    @property
    def num_steps(self) -> int:
        return sum(p.num_steps for p in self.pieces)

    @property
    def program(self) -> Any:
        """The first piece's program (what callers that look at the inputs' MIL types read)."""
        return self.pieces[0].program

    def make_state(self) -> ChunkedState:
        return ChunkedState([p.make_state() for p in self.pieces])

    def peak_activation_bytes(self) -> int:
        return max(p.peak_activation_bytes() for p in self.pieces)

    # --- prediction ---------------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, np.ndarray], state: ChunkedState | None = None) -> dict[str, np.ndarray]:
        """Run the pieces in order; returns the last piece's outputs."""
        return self._chain(inputs, state, lambda p, feed, st: p.predict(feed, st))

    def trace(self, inputs: Mapping[str, np.ndarray], *, capture: Collection[str] = (), profile: bool = False,
              state: ChunkedState | None = None) -> Trace:
        """``ReferenceExecutor.trace`` over the pieces in order: the last piece's outputs, the ops of ``capture`` any
        piece holds, and the pieces' op times added up per op family."""
        traces: list[Trace] = []

        def run(p: ReferenceExecutor, feed: dict[str, Any], st: ExecutorState | None) -> dict[str, np.ndarray]:
            traces.append(p.trace(feed, capture=capture, profile=profile, state=st))
            return traces[-1].outputs

        outputs = self._chain(inputs, state, run)
        by_family: dict[str, float] = {}
        calls: dict[str, int] = {}
        for t in traces:
            for fam, sec in t.by_family.items():
                by_family[fam] = by_family.get(fam, 0.0) + sec
            for fam, n in t.calls.items():
                calls[fam] = calls.get(fam, 0) + n
        return Trace(outputs, {k: v for t in traces for k, v in t.values.items()}, sum(t.seconds for t in traces),
                     by_family, calls)

    def _chain(self, inputs: Mapping[str, np.ndarray], state: ChunkedState | None,
               call: Callable[[ReferenceExecutor, dict[str, Any], ExecutorState | None], dict[str, np.ndarray]]
               ) -> dict[str, np.ndarray]:
        """Call ``call(piece, feed, piece state)`` on the pieces in order, each fed the model inputs it declares and
        the boundary tensors before it; returns the last call's outputs."""
        from bitnet_coreml.executor.errors import UnexpectedInputError

        if not isinstance(inputs, Mapping):
            return self.pieces[0].predict(inputs)  # the piece refuses it with its own message
        wanted = self.input_specs
        extra = [n for n in inputs if n not in wanted]
        if extra:
            raise UnexpectedInputError(f"{self.source}: unexpected input(s) {', '.join(map(str, extra))}; the model "
                                       f"declares {', '.join(wanted) or 'no inputs'}")
        if state is not None and not isinstance(state, ChunkedState):
            raise StateError(f"{self.source}: the state was not made by this chunked model's make_state()")
        values: dict[str, Any] = dict(inputs)
        out: dict[str, np.ndarray] = {}
        for k, p in enumerate(self.pieces):
            feed = {n: values[n] if n not in self._boundaries or values[n].dtype == spec.dtype
                    else values[n].astype(spec.dtype)  # fp32 mode returns fp16 outputs as fp32
                    for n, spec in p.input_specs.items() if n in values}
            out = call(p, feed, state.pieces[k] if state is not None and p.is_stateful else None)
            values.update(out)
        return out

    def __repr__(self) -> str:
        return f"ChunkedExecutor({self.source!r}, pieces={len(self.pieces)}, function={self.function_name!r})"
