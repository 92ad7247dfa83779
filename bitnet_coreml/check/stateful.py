"""Check rules of stateful packages (``convert --stateful``): OS features, state dtype and shape, context.

:class:`StatefulSpec` describes the package the converter will write (from ``config.json`` and the
``--context`` / ``--prefill`` options); :func:`bitnet_coreml.check.report.run_check` takes it as
``stateful=``. Its KV-cache bytes (``2 x layers x kv_heads x context x head_dim x 2``, twice that for an
fp32 package's hi+lo states) are added to the memory the ANE-budget and GPU-memory rules compare.
The rows the rules cite are in ``data/capabilities.toml`` (features ``state_tensors``,
``multifunction``; limits ``state_dtype``, ``state_dim_multiple``, ``stateful_context``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bitnet_coreml.check.rules import Finding, RuleContext, rule
from bitnet_coreml.package.stateful import CONTEXT_MULTIPLE, kv_cache_bytes


@dataclass(frozen=True)
class StatefulSpec:
    """A stateful package as asked for: sizes from the options, shapes from the model's config."""

    context: int  # as asked (before rounding)
    prefill: int
    layers: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int
    exact_context: bool = False

    @property
    def multiple(self) -> int:
        return CONTEXT_MULTIPLE

    def converted_context(self) -> int:
        from bitnet_coreml.package.stateful import round_context

        return round_context(self.context, self.exact_context)[0]

    def cache_bytes(self, precision: str) -> int:
        return kv_cache_bytes(self.layers, self.kv_heads, self.converted_context(), self.head_dim,
                              cache="fp16x2" if precision == "fp32" else "fp16")

    def to_dict(self, precision: str) -> dict[str, Any]:
        return {"context": self.context, "converted_context": self.converted_context(), "prefill": self.prefill,
                "state_shape": [1, self.kv_heads, self.converted_context(), self.head_dim],
                "states": 2 * self.layers * (2 if precision == "fp32" else 1), "kv_cache_bytes": self.cache_bytes(precision)}

    @classmethod
    def from_checkpoint(cls, source: Any, context: int, prefill: int, exact_context: bool = False, *,
                        allow_dequant: bool = False) -> StatefulSpec:
        """The spec of a checkpoint folder's (or a BitNet GGUF file's) stateful package."""
        from bitnet_coreml.frontend import source_config

        cfg = source_config(source, allow_dequant=allow_dequant)
        return cls(context=context, prefill=prefill, layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                   head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                   exact_context=exact_context)


@rule("stateful_context", "--context larger than the model's max_position_embeddings")
def _context(ctx: RuleContext) -> Iterator[Finding]:
    st = ctx.stateful
    if st is None:
        return
    lim = ctx.db.limit("stateful_context")
    c = st.converted_context()
    if c > st.max_position_embeddings:
        yield Finding("stateful_context", lim.severity,
                      f"--context {st.context}" + (f" (rounded to {c})" if c != st.context else "")
                      + f" exceeds the model's max_position_embeddings {st.max_position_embeddings}; "
                      f"use --context {st.max_position_embeddings // st.multiple * st.multiple or st.max_position_embeddings}"
                      " or less", None, c, st.max_position_embeddings, lim.source)


@rule("state_dim_multiple_32", "a state dimension that is not a multiple of 32 fails on the ANE")
def _multiple(ctx: RuleContext) -> Iterator[Finding]:
    st = ctx.stateful
    if st is None or st.context % st.multiple == 0:
        return
    lim = ctx.db.limit("state_dim_multiple")
    if st.exact_context:
        yield Finding("state_dim_multiple_32", lim.severity,
                      f"KV-cache states [1, {st.kv_heads}, {st.context}, {st.head_dim}]: context {st.context} is not a "
                      f"multiple of {st.multiple} (kept by --exact-context); the ANE rejects such states",
                      None, st.context, st.multiple, lim.source)
    else:
        yield Finding("state_dim_multiple_32", "info",
                      f"--context {st.context} is not a multiple of {st.multiple}: the converter rounds it up to "
                      f"{st.converted_context()}", None, st.context, st.multiple, lim.source,
                      fixed_by="convert --stateful (rounds --context up; --exact-context keeps it)")


@rule("state_fp16", "Core ML states are fp16 only")
def _fp16(ctx: RuleContext) -> Iterator[Finding]:
    if ctx.stateful is None or ctx.precision != "fp32":
        return
    lim = ctx.db.limit("state_dtype")
    yield Finding("state_fp16", "info",
                  "states are fp16 only: the fp32 package holds each K/V cache as two fp16 states (value and "
                  "rounding remainder, ~22 significant bits), twice the cache memory", None, "fp32", lim["value"],
                  lim.source, fixed_by="convert --stateful (hi + lo fp16 states)")
