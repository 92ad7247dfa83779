"""Run a stateful package (``convert --stateful``) call by call with one KV-cache state.

:class:`StatefulRun` holds the executors of the package's ``prefill`` and ``decode`` functions
(sharing their weights, see ``executor/shared.py``) and one :class:`ExecutorState` that both read and
write, as an app holds one ``MLState`` for both functions. ``call`` runs one function at an explicit
position (on another runtime when given an ``engine``: ``generation.engines``, Core ML on macOS); ``feed`` runs any number of tokens from the next free position: whole chunks of ``P``
through ``prefill`` and the rest through ``decode`` (or every token through the function asked for).
Positions are checked against the package's context before anything runs (``InputError``, exit 2).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bitnet_coreml.errors import InputError
from bitnet_coreml.executor.chunked import open_executor
from bitnet_coreml.executor.executor import ExecutorState, ReferenceExecutor
from bitnet_coreml.package.stateful import DECODE, PREFILL, StatefulInfo, check_position, stateful_info

__all__ = ["StatefulRun"]


class StatefulRun:
    """``StatefulRun(package).feed(ids)`` -> logits of the fed tokens; the cache carries over calls."""

    def __init__(self, package: str | os.PathLike[str], *, fp32: bool = False, engine: Any = None) -> None:
        info = stateful_info(package)
        if info is None:
            raise InputError(f"{package}: not a stateful package (no prefill/decode functions); convert with --stateful")
        self.info: StatefulInfo = info
        self.package = str(package)
        # another runtime (a generation Engine: Core ML on macOS) with its own state, or the executor's
        self.engine = engine
        self.executors: dict[str, ReferenceExecutor] = {}
        if engine is None:
            decode = open_executor(self.package, fp32=fp32, function_name=DECODE)  # a package or a chunked folder
            self.executors = {DECODE: decode, PREFILL: decode.function(PREFILL)}
            self.state: ExecutorState = decode.make_state()
        self.position = 0  # the next free cache slot

    def reset(self) -> None:
        """Start a new sequence: an empty cache at position 0 (executor runs; an engine starts a new run)."""
        if self.engine is not None:
            raise InputError("reset: a run on another engine holds that engine's state; start a new run")
        self.state = self.executors[DECODE].make_state()
        self.position = 0

    def call(self, function: str, ids: np.ndarray, position: int) -> np.ndarray:
        """One call of ``function`` on ``ids`` ([1, S] with S its token count) at ``position``; returns logits."""
        check_position(self.info, function, int(position))
        ids = np.asarray(ids)
        want = (1, self.info.tokens(function))
        if ids.shape != want:
            raise InputError(f"{function}: input_ids has shape {list(ids.shape)}; the package takes {list(want)}")
        if self.engine is not None:
            logits = np.asarray(self.engine.call(function, ids.astype(np.int32), int(position)))[None]
        else:
            out = self.executors[function].predict(
                {"input_ids": ids.astype(np.int32), "position": np.array([position], np.int32)}, self.state)
            logits = out["logits"]
        self.position = int(position) + want[1]
        return logits

    def feed(self, ids: Any, *, position: int | None = None, function: str | None = None) -> np.ndarray:
        """Run ``ids`` (``[1, N]`` or ``[N]``) from ``position`` (default: where the last call ended).

        ``function=None``: chunks of P through prefill, the rest through decode; ``"decode"``: every
        token through decode; ``"prefill"``: N must be a multiple of P. Returns the logits the calls
        return, concatenated on the token axis (``[1, n, V]``).
        """
        arr = np.asarray(ids).reshape(1, -1)
        n = arr.shape[1]
        pos = self.position if position is None else int(position)
        p = self.info.prefill
        if n < 1:
            raise InputError("input_ids is empty; give at least one token")
        if function not in (None, PREFILL, DECODE):
            raise InputError(f"function {function!r}; allowed: {PREFILL}, {DECODE}")
        if function == PREFILL and n % p:
            raise InputError(f"--function prefill takes chunks of {p} tokens; got {n} (use decode for the rest)")
        chunks = n // p if function in (None, PREFILL) else 0
        if pos < 0 or pos + n > self.info.context:  # the whole run fits, before any call writes the cache
            raise InputError(f"{n} token(s) from position {pos} need cache slots {pos}..{pos + n - 1}, but the "
                             f"package's context is {self.info.context} (slots 0..{self.info.context - 1})")
        outs = []
        for c in range(chunks):
            outs.append(self.call(PREFILL, arr[:, c * p:(c + 1) * p], pos + c * p))
        for t in range(chunks * p, n):
            outs.append(self.call(DECODE, arr[:, t:t + 1], pos + t))
        return np.concatenate(outs, axis=1)
