"""GenerationSession: text generation over a stateful package, with compute-unit fallback mid-sequence.

A session owns one KV state on one compute unit (an :class:`~.engines.Engine`) and the tokens fed so
far. ``prefill(ids)`` feeds ids in ``P``-sized calls of the package's ``prefill`` function (``P`` from
its metadata; a last partial chunk is padded when the package returns the logits of every position,
else fed through ``decode``), ``step()`` picks the next token and ``generate(prompt, ...)`` iterates
over new tokens until ``max_new_tokens``, an end-of-sequence id or a stop string.

Fallback inside a generation: every call goes through the recovery taxonomy (``runtime/recovery``);
a transient error retries the same call (it rewrites the same cache slots, so a partial write is
harmless), a unit that fails for good is replaced by the next unit of the chain, whose fresh state
is rebuilt by **replaying the calls made so far** (same functions, same chunks, same positions), so
its state, and every later logit, is what the failed unit's would have been on the same engine
kind: the text does not change. ``recoveries`` and :meth:`get_recovery_stats` record each switch.
Engines come from ``open_engine`` (default :func:`~.engines.open_engine`); the tests pass an opener that
wraps each engine with a faulty one (``tests/support/faults.py``), so injected faults hit every call,
replays included.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.errors import ExhaustedError, InputError, ModelError
from bitnet_coreml.generation.engines import Engine, open_engine, unavailable_reason
from bitnet_coreml.generation.sampling import Sampler, SamplingConfig
from bitnet_coreml.generation.tokenizer import TextStream, TextTokenizer
from bitnet_coreml.package.stateful import DECODE, PREFILL, StatefulInfo
from bitnet_coreml.runtime.recovery import RecoveryAction, classify_exception, handle_error
from bitnet_coreml.runtime.stats import ErrorRecovery
from bitnet_coreml.runtime.strategy import ComputeUnit, FallbackStrategy
from bitnet_coreml.runtime.units import Unit, make_units

__all__ = ["GenerationSession", "GenerationStats", "SamplingConfig", "not_stateful_message"]

log = logging.getLogger(__name__)


def not_stateful_message(package: str | os.PathLike[str]) -> str:
    return (f"{package}: not a stateful package (no prefill/decode functions with a KV cache); "
            f"convert the checkpoint with `bitnet-coreml convert CHECKPOINT -o OUT.mlpackage --stateful`")


def _stored_facts(package: Path) -> tuple[StatefulInfo, int | None] | None:
    """The stateful facts and vocabulary size from the package's stored decode table, None without a usable one
    (``executor/fused_store.py``: its header is checked against the package's specification)."""
    from bitnet_coreml.executor.fused_store import StaleTable, open_table

    try:
        table = open_table(package)
    except StaleTable:
        return None  # the engine says why when it falls back
    return None if table is None else (table.stateful_info(), table.vocab_size)


@dataclass
class GenerationStats:
    """Timings and counts of the last generation (seconds; rates in tokens per second)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_calls: int = 0
    unit: str | None = None
    decode_engine: str | None = None  # reference unit: "fused" or "interpreter" (engines.ReferenceEngine)
    decode_note: str | None = None  # why the interpreter ran decode, or which fused kernel ran and why
    stop_reason: str | None = None
    recoveries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tok_s(self) -> float | None:
        return self.decode_calls / self.decode_s if self.decode_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        r = {k: v for k, v in vars(self).items()}
        r["prefill_tok_s"] = self.prefill_tok_s
        r["decode_tok_s"] = self.decode_tok_s
        return r


@dataclass(frozen=True)
class _Call:
    function: str
    start: int  # position of the first token
    count: int  # real tokens (the rest of a prefill chunk is padding)


class GenerationSession:
    """Generate from a stateful package (``convert --stateful``) with compute-unit fallback.

    ``units``: unit names (``ane``, ``gpu``, ``cpu``, ``reference``), :class:`ComputeUnit` values or
    :class:`~bitnet_coreml.runtime.units.Unit` objects (several named ``ReferenceUnit`` s make a
    chain that falls back on any OS); default: the strategy's chain. ``tokenizer``: a
    :class:`TextTokenizer`, a folder with ``tokenizer.json``, or None for the package's own assets
    (ids only when it has none). ``open_engine(unit, package, fp32=...)`` makes a unit's
    :class:`~.engines.Engine` (default :func:`~.engines.open_engine`). ``decode_engine``: on the
    reference unit, ``auto`` (the fused kernel when the package's decode function translates, else
    the interpreter), ``fused`` (refuse a package it cannot fuse) or ``interpreter``.
    """

    def __init__(self, package: str | os.PathLike[str], *, units: Sequence[str | ComputeUnit | Unit] | None = None,
                 tokenizer: TextTokenizer | str | os.PathLike[str] | None = None, fp32: bool = False,
                 strategy: FallbackStrategy | None = None,
                 open_engine: Callable[..., Engine] = open_engine, decode_engine: str = "auto") -> None:
        self.package = Path(package)
        from bitnet_coreml.generation.engines import DECODE_ENGINES

        if decode_engine not in DECODE_ENGINES:
            raise InputError(f"--engine {decode_engine}: allowed: {', '.join(DECODE_ENGINES)}")
        self.decode_engine = decode_engine
        from bitnet_coreml.package.chunked import stateful_parts

        described, assets = stateful_parts(self.package)  # a chunked model folder: its last / first piece
        if not (described / "Manifest.json").is_file():
            raise InputError(f"{self.package}: not an .mlpackage (no Manifest.json)")
        # the vocabulary: the last dimension of decode's logits (ids are checked before any call)
        self.vocab_size: int | None = None
        self.info: StatefulInfo
        stored = _stored_facts(described)
        if stored is not None:  # the stored table's header (its specification checked): no coremltools
            self.info, self.vocab_size = stored
        else:
            from bitnet_coreml.package.reader import read_package_spec
            from bitnet_coreml.package.stateful import function_specs, stateful_info

            # read-only (MLModel(path) would rewrite Manifest.json); refuses a corrupt package naming the file
            spec = read_package_spec(described).spec
            info = stateful_info(spec)
            if info is None:
                raise InputError(not_stateful_message(self.package))
            self.info = info
            for fn in function_specs(spec):
                if fn["name"] == DECODE:
                    shapes = [o.get("shape") for o in fn["outputs"] if o.get("shape")]
                    self.vocab_size = int(shapes[0][-1]) if shapes else None
        self.strategy = strategy or FallbackStrategy()
        self._open_engine = open_engine
        self.fp32 = fp32
        if isinstance(tokenizer, TextTokenizer) or tokenizer is None:
            self.tokenizer = tokenizer if tokenizer is not None else TextTokenizer.from_package(assets)
        else:
            self.tokenizer = TextTokenizer.from_dir(tokenizer)
        chain = units if units is not None else self.strategy.enabled_units()
        self._units: list[Unit] = make_units(chain, probe_coreml=False)
        if not self._units:
            raise InputError("--units: give at least one unit")
        self._recovery = ErrorRecovery(recent_error_window_s=self.strategy.recent_error_window_s,
                                       latency_window=self.strategy.latency_window)
        self._skipped: dict[str, str] = {}
        self._next = 0  # index of the next unit to try
        self._engine: Engine | None = None
        self.tokens: list[int] = []
        self._calls: list[_Call] = []
        self._logits: np.ndarray | None = None
        self._pending: int | None = None
        self.stats = GenerationStats()
        self.recoveries: list[dict[str, Any]] = []
        self.text: TextStream | None = None  # the new text of the last generate() (with a tokenizer)
        self.load_s = 0.0
        t0 = time.perf_counter()
        self._ensure_engine()
        self.load_s = time.perf_counter() - t0

    # --- state ---------------------------------------------------------------------------------

    @property
    def unit(self) -> str | None:
        """The unit that answers now."""
        return self._engine.name if self._engine is not None else None

    @property
    def context(self) -> int:
        return self.info.context

    def reset(self) -> None:
        """Forget every token: the next call starts at position 0 (the cache is overwritten in order)."""
        self.tokens = []
        self._calls = []
        self._logits = None
        self._pending = None

    def get_recovery_stats(self) -> Any:
        return self._recovery.get_recovery_stats()

    # --- feeding -------------------------------------------------------------------------------

    def check_ids(self, ids: Sequence[int], what: str = "token ids") -> list[int]:
        """Refuse ids outside the vocabulary (InputError, exit 2)."""
        out = [int(i) for i in ids]
        vocab = self.vocab_size or (self.tokenizer.vocab_size if self.tokenizer is not None else None)
        bad = [i for i in out if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            limit = f"0..{vocab - 1}" if vocab is not None else ">= 0"
            raise InputError(f"{what}: unknown token id(s) {bad[:5]}; the vocabulary has ids {limit}")
        return out

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed ``ids`` after the tokens so far; returns the logits after the last one (float32 ``[V]``)."""
        ids = self.check_ids(ids)
        if not ids:
            raise InputError("prefill: no token ids to feed (empty prompt)")
        self._check_room(len(ids))
        p = self.info.prefill
        i = 0
        while i < len(ids):
            chunk = ids[i:i + p]
            pos = len(self.tokens)
            if len(chunk) == p or (self.info.prefill_logits == "all" and pos + p <= self.context):
                self._logits = self._run(_Call(PREFILL, pos, len(chunk)), chunk)
                i += len(chunk)
            else:  # a last partial chunk the prefill function cannot take: decode its tokens one by one
                for t in chunk:
                    self._logits = self._run(_Call(DECODE, len(self.tokens), 1), [t])
                i += len(chunk)
        assert self._logits is not None
        return self._logits

    def feed(self, token: int) -> np.ndarray:
        """Feed one token through ``decode``; returns the logits after it."""
        (token,) = self.check_ids([token])
        self._check_room(1)
        self._logits = self._run(_Call(DECODE, len(self.tokens), 1), [token])
        return self._logits

    def step(self, sampler: Sampler | None = None) -> int:
        """Pick the next token from the current logits and feed it (lazily: on the next step)."""
        if self._pending is not None:
            self.feed(self._pending)
        if self._logits is None:
            raise InputError("step: nothing fed yet; call prefill(ids) first")
        tok = (sampler or Sampler(SamplingConfig())).pick(self._logits, self.tokens)
        self._pending = tok
        return tok

    def _check_room(self, n: int) -> None:
        if len(self.tokens) + n > self.context:
            raise InputError(f"{len(self.tokens)} tokens so far + {n} more exceed the package's context of "
                             f"{self.context} tokens")

    # --- generation ------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            if self.tokenizer is None:
                raise InputError(f"{self.package}: carries no tokenizer; give --tokenizer DIR (a folder with "
                                 "tokenizer.json) or token ids with --ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise InputError("the prompt is empty (no token ids)")
        return self.check_ids(ids, "prompt")

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64,
                 sampling: SamplingConfig | None = None, stop: Sequence[str] = (),
                 stop_on_eos: bool = True, text: TextStream | None = None) -> Iterator[int]:
        """Yield new token ids for ``prompt`` (text or ids), starting from an empty cache.

        Stops after ``max_new_tokens``, after an end-of-sequence id (yielded, as transformers does)
        or once the new text contains a stop string (needs the tokenizer; matched on complete text,
        :class:`~bitnet_coreml.generation.tokenizer.TextStream`). Refuses (exit 2) when the prompt plus
        ``max_new_tokens`` exceed the context. ``stats`` holds the timings; ``self.text`` the new text
        (``text``, a stream the caller made with its stop strings, or one made here from ``stop``): each
        token is pushed into it before it is yielded, and it is flushed when the generation ends.
        """
        ids = self.encode(prompt)
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
        if len(ids) + max_new_tokens > self.context:
            raise InputError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceed the package's "
                             f"context of {self.context} tokens (shorten the prompt or lower --max-new-tokens)")
        if stop and self.tokenizer is None:
            raise InputError("--stop needs a tokenizer (the package has none; give --tokenizer DIR)")
        if text is None and self.tokenizer is not None:
            text = TextStream(self.tokenizer, stop)
        self.text = text
        sampler = Sampler(sampling or SamplingConfig())
        eos = set(self.tokenizer.eos_ids) if (stop_on_eos and self.tokenizer is not None) else set()
        self.reset()
        st = self.stats = GenerationStats(prompt_tokens=len(ids))
        self.recoveries = st.recoveries
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        st.prefill_s = time.perf_counter() - t0
        new: list[int] = []
        for i in range(max_new_tokens):
            if i:
                t1 = time.perf_counter()
                logits = self.feed(new[-1])
                st.decode_s += time.perf_counter() - t1
                st.decode_calls += 1
            tok = sampler.pick(logits, self.tokens)
            new.append(tok)
            st.new_tokens = len(new)
            st.unit = self.unit
            st.decode_engine = getattr(self._engine, "decode_engine", None)
            st.decode_note = getattr(self._engine, "decode_note", None)
            if st.ttft_s is None:
                st.ttft_s = time.perf_counter() - t0
            if text is not None:
                text.push(tok)
            yield tok
            if text is not None and text.stopped:
                st.stop_reason = "stop"
                return
            if tok in eos:
                st.stop_reason = "eos"
                break
        else:
            st.stop_reason = "max_new_tokens"
        if text is not None:
            text.flush()  # the held tail is final now; a stop string may end in it
            if text.stopped:
                st.stop_reason = "stop"

    # --- calls with fallback ---------------------------------------------------------------------

    def _ensure_engine(self) -> Engine:
        while self._engine is None:
            if self._next >= len(self._units):
                summary = "; ".join(f"{u}: {why}" for u, why in self._skipped.items())
                raise ExhaustedError(f"{self.package.name}: no compute unit can generate ({summary})",
                                     [{"unit": u, "reason": why} for u, why in self._skipped.items()])
            unit = self._units[self._next]
            self._next += 1
            why = self._unavailable(unit)
            if why is not None:
                self._skipped[unit.name] = why
                self._recovery.record_skip(unit.name)
                continue
            try:
                engine = self._open_engine(unit, self.package, fp32=self.fp32, decode_engine=self.decode_engine)
                self._replay(engine)
            except Exception as e:  # noqa: BLE001 - classify_exception decides: a bug becomes InternalError, never retried
                err = classify_exception(e, context=unit.name)
                if handle_error(err) is RecoveryAction.GIVE_UP:
                    raise err from (e if err is not e else None)
                self._recovery.record_failure(unit.name, err)
                self._recovery.record_fallback(unit.name)
                self._skipped[unit.name] = err.one_line()
                continue
            self._engine = engine
        return self._engine

    def _unavailable(self, unit: Unit) -> str | None:
        return unavailable_reason(self.package, unit)

    def _replay(self, engine: Engine) -> None:
        """Rebuild ``engine``'s fresh state: the calls made so far, in order, on the same tokens."""
        if not self._calls:
            return
        t0 = time.perf_counter()
        for call in self._calls:
            self._invoke(engine, call, self.tokens[call.start:call.start + call.count])
        self.recoveries.append({"at_token": len(self.tokens), "to": engine.name, "replayed_calls": len(self._calls),
                                "replay_s": time.perf_counter() - t0})

    def _invoke(self, engine: Engine, call: _Call, ids: Sequence[int]) -> np.ndarray:
        padded = list(ids)
        if call.function == PREFILL and len(padded) < self.info.prefill and engine.pads_prefill:
            pad = self.tokenizer.eos_ids[0] if self.tokenizer is not None and self.tokenizer.eos_ids else 0
            padded += [pad] * (self.info.prefill - len(padded))
        logits = engine.call(call.function, np.asarray(padded), call.start)
        row = logits[call.count - 1] if logits.shape[0] > 1 else logits[-1]
        if not np.all(np.isfinite(row)):
            raise ModelError(f"{engine.name}: {call.function} at position {call.start} returned non-finite logits")
        if self.vocab_size is None:
            self.vocab_size = int(row.shape[-1])
        return row

    def _run(self, call: _Call, ids: Sequence[int]) -> np.ndarray:
        """One call on the current unit with retries; on a unit's failure, the next unit (state replayed)."""
        retries = 0
        delays = self.strategy.retry_delays()
        while True:
            engine = self._ensure_engine()
            self._recovery.record_attempt(engine.name)
            t0 = time.perf_counter()
            try:
                row = self._invoke(engine, call, ids)
            except Exception as e:  # noqa: BLE001 - classify_exception decides: a bug becomes InternalError, never retried
                err = classify_exception(e, context=engine.name)
                action = handle_error(err)
                if action is RecoveryAction.GIVE_UP:
                    raise err from (e if err is not e else None)
                self._recovery.record_failure(engine.name, err)
                if action is not RecoveryAction.FALLBACK and retries < len(delays):
                    self._recovery.record_retry(engine.name)
                    time.sleep(delays[retries])
                    retries += 1
                    continue
                self._recovery.record_fallback(engine.name)
                log.info("%s failed at position %d (%s); rebuilding the state on the next unit", engine.name,
                         call.start, err.one_line())
                self.recoveries.append({"at_token": call.start, "from": engine.name, "error": type(err).__name__,
                                        "reason": err.one_line()})
                self._skipped[engine.name] = err.one_line()
                self._engine = None
                retries = 0
                continue
            self._recovery.record_success(engine.name, time.perf_counter() - t0)
            self.tokens.extend(int(t) for t in ids)
            self._calls.append(call)
            return row

