"""The stateful part of ``convert --stateful``: build the ``prefill`` and ``decode`` functions.

:func:`bitnet_coreml.convert.convert` does everything it does for a stateless package (load, check,
split, fp16-safety analysis on the stateless graph of ``P`` tokens, palettize, coremltools passes,
metadata, atomic write); for a stateful one it calls :func:`build_stateful` instead of
``build_program``. That imports the checkpoint twice more as the graphs of the two functions
(``frontend/hf_stateful.py``), applies the same split and the same fp16 plan to both (matched by
node name), and builds one multifunction MIL program whose functions' equal constants are stored
once (``lower/state.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import onnx_ir as ir

from bitnet_coreml.package.stateful import DECODE, DEFAULT_FUNCTION, PREFILL, StatefulInfo

log = logging.getLogger(__name__)


def function_models(source: str | os.PathLike[str], *, prefill: int, context: int, prefill_logits: str,
                    embed_dtype: str, cache: str, split_limit: int, allow_dequant: bool = False,
                    tables: dict[Any, Any] | None = None) -> dict[str, ir.Model]:
    """The graphs of the ``prefill`` and ``decode`` functions, named and split like the stateless graph.

    ``tables``: the split's cache of tables read (``lower/split.py``), shared with the caller's split of
    the stateless graph of the same checkpoint."""
    from bitnet_coreml.frontend.hf_stateful import load_stateful_function
    from bitnet_coreml.lower.program import assign_node_names, check_supported
    from bitnet_coreml.lower.split import split_large_dims

    models: dict[str, ir.Model] = {}
    tables = {} if tables is None else tables  # the embedding read and converted once for both graphs
    for name, tokens in ((PREFILL, prefill), (DECODE, 1)):
        m = load_stateful_function(source, tokens=tokens, context=context, logits=prefill_logits,
                                   embed_dtype=embed_dtype, cache=cache, allow_dequant=allow_dequant)
        assign_node_names(m.graph)
        if split_limit:
            split_large_dims(m, split_limit, tables=tables)
            assign_node_names(m.graph)
        check_supported(m)
        models[name] = m
    return models


def build_stateful(source: str | os.PathLike[str], options: Any, context: int, embed_dtype: str, plan: Any,
                   build: Any, notes: list[str], *, tables: dict[Any, Any] | None = None) -> tuple[Any, StatefulInfo]:
    """The multifunction program of a stateful package and what its metadata records.

    ``plan`` is the fp16-safety plan measured on the stateless graph (None for fp32), ``build`` the
    ``BuildOptions`` of the stateless build; ``notes`` receives what the reader should know; ``tables``:
    as for :func:`function_models`.
    """
    import json

    from bitnet_coreml.frontend.hf_stateful import STATES_KEY
    from bitnet_coreml.lower.fp16 import apply_fp16_plan
    from bitnet_coreml.lower.program import build_functions

    # Core ML states are fp16; an fp32 package keeps fp32 precision in its cache with a second fp16
    # state per tensor holding what rounding to fp16 lost.
    cache = "fp16x2" if options.precision == "fp32" else "fp16"
    models = function_models(source, prefill=options.prefill, context=context, prefill_logits=options.prefill_logits,
                             embed_dtype=embed_dtype, cache=cache, split_limit=options.resolved_split_limit(),
                             allow_dequant=options.allow_dequant, tables=tables)
    if plan is not None:
        for name, m in models.items():
            missing = apply_fp16_plan(m, plan)
            if missing:
                notes.append(f"{name}: fp32 node(s) of the stateless graph not found by name: {', '.join(missing)}")
    built = build_functions(models, DEFAULT_FUNCTION, build)
    states = json.loads(models[DECODE].metadata_props[STATES_KEY])
    info = StatefulInfo(context=context, prefill=options.prefill, prefill_logits=options.prefill_logits,
                        states=states, cache=cache)
    notes.append(f"stateful: functions {PREFILL} ({options.prefill} tokens, logits {options.prefill_logits}) and "
                 f"{DECODE} (1 token, default) share one copy of the weights; KV cache of {context} positions in "
                 f"{len(states)} fp16 state(s), {info.state_bytes:,} bytes")
    return built, info
