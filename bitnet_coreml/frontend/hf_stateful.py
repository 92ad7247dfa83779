"""Import a Hugging Face BitNet checkpoint as the graph of one function of a *stateful* package.

A stateful package has two functions over one KV cache held as Core ML state (``docs/ARCHITECTURE.md``,
"Stateful packages")::

    prefill: input_ids int32 [1, P], position int32 [1] -> logits [1, P, V] (or [1, 1, V]: last only)
    decode:  input_ids int32 [1, 1], position int32 [1] -> logits [1, 1, V]

``position`` is the absolute position of the first token. Both are built here by the same importer as
the stateless graph (``hf_checkpoint._Importer``), with four hooks changed:

* inputs: ``input_ids`` (int32, the package's type) and ``position``; the cache tensors
  ``k_cache_<i>`` / ``v_cache_<i>`` (fp16 ``[1, Hkv, context, head_dim]``, one pair per layer) are
  graph inputs listed in the model's ``bitnet_coreml.states`` metadata, which the program builder
  turns into Core ML states.
* positions: RoPE cos/sin rows gathered from ``[context, head_dim]`` tables at ``position + i``;
  the causal mask computed in the graph: key slot ``j`` is visible to query ``i`` iff ``j <= position + i``
  (so slots not written yet, and slots beyond the current token, are masked).
* keys/values: ``KVCacheUpdate(cache, k, position)`` writes this call's keys (after RoPE) and values
  into slots ``position .. position+S-1`` of the layer's cache and returns the whole cache; attention
  reads all ``context`` slots. GQA stays grouped: query heads are regrouped by KV head, K/V are never
  repeated.
* head: with ``logits="last"`` only the last row goes through the lm_head.

Node names of the decoder (BitLinear, RMSNorm, Relu2 ...) are the same as in the stateless graph, so
the fp16-safety plan measured on the stateless graph applies to both functions by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.frontend.hf_checkpoint import EMBED_DTYPES, MASK_VALUE, _Importer, rope_tables
from bitnet_coreml.frontend.hf_config import read_config
from bitnet_coreml.frontend.hf_safetensors import CheckpointTensors

__all__ = ["load_stateful_function", "state_names", "STATES_KEY", "PREFILL_LOGITS"]

STATES_KEY = "bitnet_coreml.states"  # model metadata: JSON {state name: [shape]} of the graph's state inputs
PREFILL_LOGITS = ("all", "last")
# How K/V are held: "fp16" (one fp16 state per tensor: what Core ML states allow) or "fp16x2" (fp32
# packages: a second fp16 state holds what rounding to fp16 lost, so the cache keeps ~22 bits)
CACHE_KINDS = ("fp16", "fp16x2")


def state_names(layers: int) -> list[str]:
    """The state names of a model with ``layers`` decoder layers, in order: k_cache_0, v_cache_0, ..."""
    return [f"{kind}_cache_{i}" for i in range(layers) for kind in ("k", "v")]


class _StatefulImporter(_Importer):
    def __init__(self, folder: Path, cfg, store: CheckpointTensors, seq_len: int,  # type: ignore[no-untyped-def]
                 embed_dtype: ir.DataType, context: int, logits: str, split_cache: bool) -> None:
        super().__init__(folder, cfg, store, seq_len, embed_dtype)
        self.C = context
        self.split_cache = split_cache
        self.logits = logits
        self.position: ir.Value | None = None
        self.states: dict[str, list[int]] = {}

    def inputs(self) -> ir.Value:
        ids = self.g.input("input_ids", ir.DataType.INT32, [1, self.S])
        self.position = self.g.input("position", ir.DataType.INT32, [1])
        return ids

    def positions(self) -> tuple[ir.Value, ir.Value, ir.Value]:
        g, cfg, S, C = self.g, self.cfg, self.S, self.C
        rep = cfg.kv_groups
        assert self.position is not None
        cos_np, sin_np = rope_tables(cfg, C)
        pos = g.op("Add", [self.position, g.const("attn.offsets", np.arange(S, dtype=np.int32))], shape=[S],
                   dtype=ir.DataType.INT32, name="attn.positions")
        cos, sin = (self._rope_rows(name, table, pos) for name, table in (("rope.cos", cos_np), ("rope.sin", sin_np)))
        # query row r of the grouped layout [rep*S] is token r % S (see hf_checkpoint.causal_mask)
        rows = g.op("Add", [self.position, g.const("attn.row_offsets", np.tile(np.arange(S, dtype=np.int32), rep))],
                    shape=[rep * S], dtype=ir.DataType.INT32)
        rows = g.op("Reshape", [rows, g.ints([rep * S, 1])], shape=[rep * S, 1], dtype=ir.DataType.INT32)
        slots = g.const("attn.slots", np.arange(C, dtype=np.int32).reshape(1, C))
        hidden = g.op("Greater", [slots, rows], shape=[rep * S, C], dtype=ir.DataType.BOOL)
        # (hidden as 0/1) * MASK_VALUE: no [rep*S, C] constant (a Where would broadcast its scalars into one)
        mask = g.op("Mul", [g.op("Cast", [hidden], {"to": ir.DataType.FLOAT}, shape=[rep * S, C]),
                            g.const("attn.masked", np.asarray(np.float32(MASK_VALUE)))],
                    shape=[rep * S, C], name="attn.causal_mask")
        return cos, sin, mask

    def _rope_rows(self, name: str, table: np.ndarray, pos: ir.Value) -> ir.Value:
        """Rows ``pos`` of a RoPE table as ``[1, 1, S, d]``; the table is stored as its first half
        (the two halves are equal), gathered, then concatenated with itself."""
        g, S, d = self.g, self.S, self.cfg.head_dim
        half = g.op("Gather", [g.const(name, np.ascontiguousarray(table[:, : d // 2])), pos], {"axis": 0},
                    shape=[S, d // 2])
        full = g.op("Concat", [half, half], {"axis": -1}, shape=[S, d])
        return g.reshape(self._f32(full), [1, 1, S, d])

    def _f32(self, v: ir.Value) -> ir.Value:
        # A computed value from float constants: an fp16-native build stores the constants in fp16, the
        # decoder computes in the graph's float (after the embedding's Cast): state that dtype.
        return self.g.op("Cast", [v], {"to": ir.DataType.FLOAT}, shape=v.shape)

    def keys_values(self, k: ir.Value, v: ir.Value, prefix: str) -> tuple[ir.Value, ir.Value]:
        g, cfg = self.g, self.cfg
        layer = int(prefix.split(".")[2])  # model.layers.<i>.self_attn
        shape = [1, cfg.num_key_value_heads, self.C, cfg.head_dim]
        out = []
        for kind, new in (("k", k), ("v", v)):
            name = f"{kind}_cache_{layer}"
            full = self._update(name, new, shape, f"{prefix}.{kind}_cache_update")
            if self.split_cache:
                # the part fp16 rounding lost, in a second fp16 state: hi + lo holds ~22 significant bits
                hi = g.op("Cast", [g.op("Cast", [new], {"to": ir.DataType.FLOAT16}, shape=new.shape,
                                         dtype=ir.DataType.FLOAT16)], {"to": ir.DataType.FLOAT}, shape=new.shape)
                lost = g.op("Sub", [new, hi], shape=new.shape)
                lo = self._update(f"{name}_lo", lost, shape, f"{prefix}.{kind}_cache_update_lo")
                full = g.op("Add", [full, lo], shape=shape, name=f"{prefix}.{kind}_cache")
            out.append(full)
        return out[0], out[1]

    def _update(self, name: str, new: ir.Value, shape: list[int], node: str) -> ir.Value:
        cache = self.g.input(name, ir.DataType.FLOAT16, shape)
        self.states[name] = shape
        return self.g.fused("KVCacheUpdate", [cache, new, self.position], {}, node, shape=shape)  # type: ignore[list-item]

    def head_rows(self, x: ir.Value) -> tuple[ir.Value, int]:
        if self.logits == "all" or self.S == 1:
            return x, self.S
        D = self.cfg.hidden_size
        return self.g.op("Slice", [x, self.g.ints([self.S - 1]), self.g.ints([self.S]), self.g.ints([1])],
                         shape=[1, 1, D], name="model.last_token"), 1

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        meta.update({"bitnet_coreml.context": str(self.C), STATES_KEY: json.dumps(self.states, sort_keys=True)})
        return meta


def load_stateful_function(path: str | os.PathLike[str], *, tokens: int, context: int, logits: str = "all",
                           embed_dtype: str = "float32", cache: str = "fp16", allow_dequant: bool = False) -> ir.Model:
    """The graph of one function of a stateful package: ``tokens`` tokens per call (P for prefill,
    1 for decode) over a KV cache of ``context`` slots; see the module docstring.

    Raises :class:`ModelLoadError` for an invalid checkpoint (as :func:`load_checkpoint`) and
    :class:`InputError` for sizes that cannot work (tokens > context, context < 1). ``path`` may also be
    a BitNet GGUF file (``frontend.gguf_model``; ``allow_dequant`` as for ``load``).
    """
    folder = Path(path)
    gguf = folder.suffix.lower() == ".gguf" and folder.is_file()
    if not folder.is_dir() and not gguf:
        raise ModelLoadError(f"{folder}: not a folder; stateful conversion needs a Hugging Face BitNet checkpoint "
                             "folder with config.json")
    for key, v in (("tokens", tokens), ("context", context)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{key} = {v!r}; expected a positive integer")
    if tokens > context:
        raise InputError(f"--prefill {tokens} is larger than --context {context}; a prefill call writes {tokens} "
                         "cache slots")
    if logits not in PREFILL_LOGITS:
        raise InputError(f"--prefill-logits {logits!r}; allowed: {', '.join(PREFILL_LOGITS)}")
    if embed_dtype not in EMBED_DTYPES:
        raise InputError(f"embed_dtype = {embed_dtype!r}; allowed: {', '.join(EMBED_DTYPES)}")
    if cache not in CACHE_KINDS:
        raise InputError(f"cache = {cache!r}; allowed: {', '.join(CACHE_KINDS)}")
    importer: type[_StatefulImporter] = _StatefulImporter
    store: CheckpointTensors
    if gguf:
        from bitnet_coreml.frontend.gguf_model import gguf_importer, open_gguf

        cfg, store = open_gguf(folder, allow_dequant=allow_dequant)
        importer = gguf_importer(_StatefulImporter)  # type: ignore[assignment]
    else:
        cfg, store = read_config(folder), CheckpointTensors(folder)
    return importer(folder, cfg, store, tokens, EMBED_DTYPES[embed_dtype], context, logits,
                    cache == "fp16x2").build()
