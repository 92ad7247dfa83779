"""fp16 range safety: find values that overflow fp16 on a calibration input and fix them exactly.

ONNX Runtime runs the (fused) graph once on a calibration input (random by default) and records the
max-abs of every floating-point value. A value is *unsafe* when it exceeds ``limit`` (fp16's max
65504 divided by a headroom factor, because one calibration input does not show the worst case).

The known case is BitNet's MLP, ``down(ffn_sub_norm(relu2(gate(x)) * up(x)))``: relu2 squares the
gate output. ``ffn_sub_norm`` is an RMSNorm, which is scale invariant except for its epsilon, so a
power-of-two factor ``c = 2**-k`` folded into both the gate and up BitLinear multipliers (Alpha)
scales its input by ``c**3``; multiplying the RMSNorm's epsilon by ``c**6`` makes the result equal
in exact arithmetic, and powers of two make it exact in floating point too. The lowering of that
RMSNorm is told the input scale (``ctx.options['rmsnorm_input_scale']``) so it computes the epsilon
term from the unscaled epsilon, which fp16 can still represent.

Anything else that overflows is kept in fp32 (the producing node and its direct consumers), and the
notes say so.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from bitnet_coreml.errors import InputError
from bitnet_coreml.opsupport import fp16_max, mask_value
from bitnet_coreml.vocab import DOMAIN, ONNX_DOMAINS

log = logging.getLogger(__name__)

FP16_MAX = fp16_max()  # the capability database's limits.fp16_range.max (65504)
HEADROOM = 8.0  # a calibration input is one sample: leave 8x (3 binades) of room above what it shows
TARGET_MAX = 2048.0  # after rescaling, the MLP's largest value aims to sit at or below this
_FEED_BYTES = 1 << 16  # initializers at least this large are fed to ORT as inputs
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


@dataclass
class Fp16Plan:
    """What the analysis did: rescaled MLPs, nodes kept in fp32, and notes for the report."""

    fp32_nodes: set[str] = field(default_factory=set)
    rmsnorm_input_scale: dict[str, float] = field(default_factory=dict)
    rescaled: list[dict[str, Any]] = field(default_factory=list)
    max_abs: float = 0.0
    notes: list[str] = field(default_factory=list)
    # per layer (bitnet_coreml.passes.layers): the largest |value| before and after the rescaling
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_nodes": sorted(self.fp32_nodes), "rescaled": self.rescaled,
                "calibration_max_abs": self.max_abs, "notes": list(self.notes), "layers": self.layers,
                "fp16_max": FP16_MAX, "limit": FP16_MAX / HEADROOM}


def random_calibration(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """A random input for every graph input: token ids within the vocabulary, floats ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        if v.shape is None or not all(isinstance(d, int) for d in v.shape):
            raise InputError(f"graph input {v.name!r} has no fixed shape ({v.shape}); cannot build a calibration input")
        shape = tuple(int(d) for d in v.shape)  # type: ignore[arg-type]
        dt = v.dtype
        if dt in (ir.DataType.INT64, ir.DataType.INT32):
            high = 100
            for use in v.uses():
                n = use.node
                if n.op_type == "Gather" and n.inputs[0] is not None and n.inputs[0].const_value is not None:
                    high = int(n.inputs[0].const_value.shape[0])  # type: ignore[arg-type]
            feeds[str(v.name)] = rng.integers(0, high, shape).astype(dt.numpy())
        elif dt in _FLOATS:
            feeds[str(v.name)] = rng.standard_normal(shape).astype(dt.numpy())  # type: ignore[union-attr]
        elif dt == ir.DataType.BOOL:
            feeds[str(v.name)] = np.ones(shape, bool)
        else:
            raise InputError(f"graph input {v.name!r}: dtype {dt} cannot be calibrated")
    return feeds


def load_calibration(path: str, model: ir.Model) -> dict[str, np.ndarray]:
    """Read a calibration ``.npz`` whose keys are the graph's input names."""
    from bitnet_coreml._files import load_npz

    feeds = load_npz(path, "calibration")
    names = [str(v.name) for v in model.graph.inputs if v.name not in model.graph.initializers]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InputError(f"{path}: calibration input lacks {', '.join(missing)}; it has {', '.join(feeds) or 'nothing'}")
    for v in model.graph.inputs:
        if str(v.name) not in names or v.shape is None:
            continue
        got = feeds[str(v.name)].shape
        want = list(v.shape)
        if len(got) != len(want) or any(isinstance(w, int) and w != g for w, g in zip(want, got, strict=False)):
            raise InputError(f"{path}: calibration array {v.name!r} has shape {list(got)}; the graph input is {want}")
        kind = feeds[str(v.name)].dtype.kind
        if v.dtype is not None and (kind not in "biuf" or (v.dtype.is_floating_point() and kind not in "f")):
            raise InputError(f"{path}: calibration array {v.name!r} has dtype {feeds[str(v.name)].dtype}; "
                             f"the graph input is {v.dtype.name}")
    return {n: feeds[n] for n in names}


def run_ort(model: ir.Model, feeds: Mapping[str, np.ndarray], *, every_value: bool = False,
            values: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Run ``model`` in ONNX Runtime without copying its weights; ``every_value`` adds all float node outputs.

    ``values`` adds just the named node outputs (intermediate values the caller compares).

    Large initializers are handed to ORT as inputs, straight from their (memory-mapped) arrays: the
    serialised graph stays small and no copy of the weights is written or parsed. ORT's graph
    optimisations are off: constant folding would materialise every ternary weight as fp32 (Cast +
    Transpose of the int8 codes), costing seconds and gigabytes. The model is restored afterwards.
    """
    graph = model.graph
    extra: list[ir.Value] = []
    if every_value:
        if any(o.dtype is None for n in graph for o in n.outputs if o.name):
            import onnx_ir.passes.common as common

            common.ShapeInferencePass(check_type=False, strict_mode=False)(model)
        outs = set(graph.outputs)
        extra = [o for node in graph for o in node.outputs if o.name and o not in outs and o.dtype in _FLOATS]
    elif values:
        wanted, outs = set(values), set(graph.outputs)
        extra = [o for node in graph for o in node.outputs if o.name in wanted and o not in outs]
        if any(o.dtype is None for o in extra):
            import onnx_ir.passes.common as common

            common.ShapeInferencePass(check_type=False, strict_mode=False)(model)
    graph.outputs.extend(extra)
    order = list(graph.initializers.values())
    big = [v for v in order if v.const_value is not None and v.const_value.nbytes >= _FEED_BYTES
           and v not in graph.inputs]
    for v in big:
        del graph.initializers[str(v.name)]
    gated, packed = _gate_weights(graph, set(big), model.opset_imports.get("", 0))
    fed = [v for v in big if v.uses()]  # a packed checkpoint weight is fed as its packed bytes instead
    for v in fed:
        # An initializer's tensor carries its type; a graph input must declare it on the value.
        # Values made by passes or importers may leave it to the tensor: take it from there.
        cv = v.const_value
        assert cv is not None
        if v.type is None:
            v.type = ir.TensorType(cv.dtype)
        if v.shape is None:
            v.shape = ir.Shape(cv.shape.numpy())
    added_inputs = [*fed, *packed]
    graph.inputs.extend(added_inputs)
    # Small initializers may still reference the source file (memory-mapped); inline them.
    swapped = {}
    for v in graph.initializers.values():
        if v.const_value is not None and not isinstance(v.const_value, ir.Tensor):
            swapped[v] = v.const_value
            v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)
    try:
        proto = ir.to_proto(model)
    finally:
        for v, cv in swapped.items():
            v.const_value = cv
        for node, w, added in gated:
            node.replace_input_with(1, w)
            for n in reversed(added):
                graph.remove(n, safe=True)
        for _ in added_inputs:
            graph.inputs.pop()
        for _ in extra:
            graph.outputs.pop()
        for v in list(graph.initializers.values()):
            del graph.initializers[str(v.name)]
        for v in order:  # restore the initializers in their original order
            graph.register_initializer(v)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # fatal only: an ORT error is raised and reported in one line, not logged too
    # Without the arena every run-time temporary (the fp32 Cast + Transpose of each int8 weight inside
    # the BitLinear bodies) goes back to the system when freed; with it, the arena grows to hold them
    # all (2B checkpoint: 8.7 GB with the arena, 3.8 GB without, same outputs).
    opts.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del proto
    names = [o.name for o in sess.get_outputs()]
    # OrtValues share the numpy buffers; plain numpy feeds are copied into ORT's own tensors.
    run_feeds = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    for v in fed:
        run_feeds[str(v.name)] = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(v.const_value.numpy()))  # type: ignore[union-attr]
    for v in packed:
        run_feeds[str(v.name)] = ort.OrtValue.ortvalue_from_numpy(packed[v]())
    results = sess.run(names, run_feeds)
    del run_feeds, sess
    return dict(zip(names, results, strict=True))


def _packed_bytes(tensor: Any) -> np.ndarray:
    return np.ascontiguousarray(tensor.packed_source())


class _NodeAdder:
    """Creates named nodes for the calibration gate and remembers them (they are removed afterwards)."""

    def __init__(self, added: list[ir.Node], base: str) -> None:
        self.added, self.base = added, base

    def __call__(self, op: str, inputs: list[ir.Value], suffix: str, **attrs: Any) -> ir.Value:
        n = ir.node(op, inputs, attributes=attrs, name=f"{self.base}.{suffix}")
        n.outputs[0].name = n.name
        self.added.append(n)
        return n.outputs[0]


def _gate_weights(graph: ir.Graph, fed: set[ir.Value], opset: int
                  ) -> tuple[list[tuple[ir.Node, ir.Value, list[ir.Node]]], dict[ir.Value, Callable[[], np.ndarray]]]:
    """Make each BitLinear's fed weight wait for the layer's activation; unpack packed checkpoint weights in ORT.

    ORT inlines the BitLinear body and its ``CastLike(W, X)`` becomes a ``Cast`` that depends on the
    weight alone, so the executor casts (and transposes) weights to fp32 long before their layer
    runs and holds them meanwhile (2B checkpoint: +5.5 GB at the peak). The gate
    ``Expand(W, max(Shape(W), 0 * Shape(X)[:1]))`` is an exact identity whose result exists only
    once ``X`` does (packed bytes: ``Where(Shape(X)[:1] == Shape(X)[:1], P, P)``, uint8). A checkpoint weight that is stored packed (uint8 ``[N/4, K]``, row block ``i``
    in bits ``2i..2i+1``, value = code + 1) is fed as those bytes (a quarter of the int8 codes) and
    unpacked by the gate: ``(P << (6 - 2i)) >> 6`` per block, Concat, Cast to float, minus 1. A tensor
    with ``calibration_feed()`` (a GGUF TQ2_0 weight: ``frontend.gguf_ternary``) names its own uint8 bytes
    (mapped from its file) and the nodes that turn them into float codes, which the same gate guards.

    Returns (node, original weight, added nodes) per gated node, and the packed inputs to feed.
    """
    gated: list[tuple[ir.Node, ir.Value, list[ir.Node]]] = []
    packed: dict[ir.Value, Callable[[], np.ndarray]] = {}
    if opset < 15:  # Shape's start/end arrived in opset 15; such old graphs are not worth a variant
        return gated, packed
    for node in list(graph):
        if not (node.domain == DOMAIN and node.op_type == "BitLinear" and len(node.inputs) > 1):
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or w not in fed:
            continue
        base = f"{w.name}.calibration_gate"
        added: list[ir.Node] = []
        add = _NodeAdder(added, base)
        shape = add("Shape", [x], "shape", start=0, end=1)
        source = getattr(w.const_value, "packed_source", None)
        own = getattr(w.const_value, "calibration_feed", None)
        feed = own() if own is not None and len(w.uses()) == 1 else None
        if feed is not None:
            # the tensor's own bytes (e.g. a GGUF file's mapped TQ2_0 blocks) and the nodes that unpack them
            raw, unpack = feed
            p = ir.Value(name=f"{w.name}.raw", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(raw.shape))
            packed[p] = functools.partial(np.ascontiguousarray, raw)
            new_w = unpack(add, add("Where", [add("Equal", [shape, shape], "eq"), p, p], "where"))
        elif source is not None and getattr(w.const_value, "kind", "") == "packed" \
                and getattr(w.const_value, "is_packed", False) and len(w.uses()) == 1:
            tensor: Any = w.const_value
            rows, k = (int(d) for d in tensor.shape.numpy())
            p = ir.Value(name=f"{w.name}.packed", type=ir.TensorType(ir.DataType.UINT8),
                         shape=ir.Shape([rows // 4, k]))
            packed[p] = functools.partial(_packed_bytes, tensor)
            gate = add("Where", [add("Equal", [shape, shape], "eq"), p, p], "where")
            blocks = []
            for i in range(4):
                left = add("Constant", [], f"l{i}", value=ir.tensor(np.array(6 - 2 * i, np.uint8)))
                right = add("Constant", [], f"r{i}", value=ir.tensor(np.array(6, np.uint8)))
                hi = add("BitShift", [gate, left], f"shl{i}", direction="LEFT")
                blocks.append(add("BitShift", [hi, right], f"shr{i}", direction="RIGHT"))
            idx = add("Concat", blocks, "concat", axis=0)
            f = add("Cast", [idx], "cast", to=int(ir.DataType.FLOAT))
            one = add("Constant", [], "one", value=ir.tensor(np.array(1.0, np.float32)))
            new_w = add("Sub", [f, one], "codes")
        else:
            # Expand(W, max(Shape(W), 0 * Shape(X)[:1])): the same identity for any dtype (ORT 1.23, the last
            # release for Python 3.10, has no int8 Where; Expand takes every fixed-size type)
            zero = add("Constant", [], "zero", value=ir.tensor(np.array([0], np.int64)))
            dims = add("Max", [add("Shape", [w], "wshape"), add("Mul", [shape, zero], "x0")], "dims")
            new_w = add("Expand", [w, dims], "where")
        graph.insert_before(node, added)
        node.replace_input_with(1, new_w)
        gated.append((node, w, added))
    return gated, packed


def measure(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """(max, min) of every floating-point node output of ``model`` on ``feeds`` (ONNX Runtime)."""
    stats: dict[str, tuple[float, float]] = {}
    for name, arr in run_ort(model, feeds, every_value=True).items():
        a = np.asarray(arr)
        if a.dtype.kind == "f" and a.size:
            stats[name] = (float(np.max(a)), float(np.min(a)))
    return stats


def _single_use(v: ir.Value | None) -> ir.Node | None:
    if v is None:
        return None
    uses = list(v.uses())
    return uses[0].node if len(uses) == 1 else None


def _fused(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.domain == DOMAIN and node.op_type == op


def _mlp_pattern(relu2: ir.Node) -> tuple[ir.Node, ir.Node, ir.Node] | None:
    """(gate BitLinear, up BitLinear, RMSNorm) around ``relu2`` if it is the BitNet MLP shape."""
    x = relu2.inputs[0]
    gate = x.producer() if x is not None else None
    if not _fused(gate, "BitLinear") or _single_use(x) is not relu2:
        return None
    mul = _single_use(relu2.outputs[0])
    if mul is None or mul.op_type != "Mul" or mul.domain not in ONNX_DOMAINS:
        return None
    other = mul.inputs[1] if mul.inputs[0] is relu2.outputs[0] else mul.inputs[0]
    up = other.producer() if other is not None else None
    if not _fused(up, "BitLinear") or up is gate or _single_use(other) is not mul:
        return None
    norm = _single_use(mul.outputs[0])
    if not _fused(norm, "RMSNorm") or norm.inputs[0] is not mul.outputs[0]:  # type: ignore[union-attr]
        return None
    return gate, up, norm  # type: ignore[return-value]


def _scale_alpha(node: ir.Node, c: float) -> None:
    a = node.inputs[2]
    assert a is not None and a.const_value is not None
    new = (a.const_value.numpy().astype(np.float64) * c).astype(np.float32)
    a.const_value = ir.tensor(new, name=a.name)


def _rescale_mlp(model: ir.Model, gate: ir.Node, up: ir.Node, norm: ir.Node, c: float) -> None:
    """Fold ``c`` into the gate and up multipliers and ``c**6`` into the RMSNorm's epsilon (in place)."""
    from bitnet_coreml.passes.fused import ensure_function

    _scale_alpha(gate, c)
    _scale_alpha(up, c)
    new_eps = float(np.float32(float(norm.attributes["epsilon"].as_float()) * c ** 6))
    norm.attributes["epsilon"] = ir.AttrFloat32("epsilon", new_eps)
    norm.overload = ensure_function(model, "RMSNorm", {"epsilon": new_eps})


def apply_fp16_plan(model: ir.Model, plan: Fp16Plan) -> list[str]:
    """Apply the MLP rescales of ``plan`` (measured on another graph of the same model) to ``model``,
    matching nodes by name; returns the plan's fp32 nodes that ``model`` does not have.

    The graphs of a stateful package's functions name their decoder nodes as the stateless graph
    does, so the analysis runs once (on the stateless graph) and applies to every function.
    """
    nodes = {n.name: n for n in model.graph if n.name}
    for entry in plan.rescaled:
        names = (entry["gate"], entry["up"], entry["rmsnorm"])
        missing = [n for n in names if n not in nodes]
        if missing:
            raise InputError(f"fp16 plan: node(s) {', '.join(missing)} not found in the graph it is applied to")
        _rescale_mlp(model, nodes[entry["gate"]], nodes[entry["up"]], nodes[entry["rmsnorm"]], float(entry["scale"]))
    return sorted(n for n in plan.fp32_nodes if n not in nodes)


def _layer_maxima(model: ir.Model, before: Mapping[str, float], after: Mapping[str, float], plan: Fp16Plan
                  ) -> list[dict[str, Any]]:
    """Per layer: the largest |value| on the calibration input (and which value), before and after rescaling.

    ``after`` is what the package computes (rescaled MLPs); values kept in fp32 and rescaled relu2
    nodes are listed by node name. Attention masks count as 0 (``bitnet_coreml.opsupport.mask_value``).
    """
    from bitnet_coreml.passes.layers import group_order, layer_groups

    labels = layer_groups(model.graph)
    rescaled = {str(e["relu2"]) for e in plan.rescaled}
    rows: dict[str, dict[str, Any]] = {
        lab: {"layer": lab, "max_abs": 0.0, "max_abs_after": 0.0, "value": None, "rescaled": [], "fp32_nodes": []}
        for lab in group_order(labels)}
    for node, lab in zip(model.graph, labels, strict=True):
        row = rows[lab]
        for o in node.outputs:
            name = o.name or ""
            if name in before and before[name] > row["max_abs"]:
                row["max_abs"], row["value"] = before[name], name
            if name in after:
                row["max_abs_after"] = max(row["max_abs_after"], after[name])
        if node.name in rescaled:
            row["rescaled"].append(node.name)
        if node.name in plan.fp32_nodes:
            row["fp32_nodes"].append(node.name)
    return list(rows.values())


def make_fp16_safe(model: ir.Model, feeds: Mapping[str, np.ndarray], *, headroom: float = HEADROOM) -> Fp16Plan:
    """Analyse ``model`` on ``feeds`` and rewrite it in place (see the module docstring)."""
    plan = Fp16Plan()
    limit = FP16_MAX / headroom
    ranges = measure(model, feeds)
    masks = set()
    for node in model.graph:
        for o in node.outputs:
            if o.name in ranges and mask_value(o, *ranges[o.name], limit):
                masks.add(o.name)
    stats = {k: (0.0 if k in masks else max(abs(hi), abs(lo))) for k, (hi, lo) in ranges.items()}
    before = dict(stats)
    plan.max_abs = max(stats.values(), default=0.0)
    if masks:
        plan.notes.append(f"fp16: {len(masks)} attention-mask value(s) hold -inf-like constants that softmax maps to 0; "
                          "left in fp16")
    for node in list(model.graph):
        if not _fused(node, "Relu2"):
            continue
        pat = _mlp_pattern(node)
        if pat is None:
            continue
        gate, up, norm = pat
        g = stats.get(gate.outputs[0].name or "", 0.0)
        r = stats.get(node.outputs[0].name or "", 0.0)
        u = stats.get(up.outputs[0].name or "", 0.0)
        p = stats.get(norm.inputs[0].name or "", 0.0)  # type: ignore[union-attr]
        worst = max(g, r, u, p)
        if not math.isfinite(worst) or worst <= limit:
            continue
        # smallest k with max(g c, u c, r c^2, p c^3) <= TARGET_MAX, c = 2^-k
        k = 0
        while max(g * 2.0 ** -k, u * 2.0 ** -k, r * 4.0 ** -k, p * 8.0 ** -k) > TARGET_MAX and k < 40:
            k += 1
        c = 2.0 ** -k
        _rescale_mlp(model, gate, up, norm, c)
        plan.rmsnorm_input_scale[norm.name or ""] = c ** 3
        for val, v, f in ((gate.outputs[0], g, c), (node.outputs[0], r, c * c), (up.outputs[0], u, c),
                          (norm.inputs[0], p, c ** 3)):
            if val is not None and val.name:
                stats[val.name] = v * f
        entry = {"relu2": node.name, "gate": gate.name, "up": up.name, "rmsnorm": norm.name, "factor": f"2^-{k}",
                 "scale": c,
                 "max_abs_before": max(r, p), "max_abs_after": max(r * c * c, p * c ** 3)}
        plan.rescaled.append(entry)
        plan.notes.append(f"fp16: relu2 {node.name!r} reached {max(r, p):.4g} on the calibration input; folded "
                          f"2^-{k} into {gate.name!r}/{up.name!r} before scale-invariant RMSNorm {norm.name!r}")
    # Whatever still exceeds the limit stays in fp32: its producer and that value's direct consumers.
    for node in model.graph:
        if any(not (stats.get(o.name or "", 0.0) <= limit) for o in node.outputs if o.name in stats):
            plan.fp32_nodes.add(node.name or "")
            for o in node.outputs:
                for use in o.uses():
                    plan.fp32_nodes.add(use.node.name or "")
    plan.fp32_nodes.discard("")
    plan.layers = _layer_maxima(model, before, stats, plan)
    if plan.fp32_nodes:
        plan.notes.append(f"fp16: {len(plan.fp32_nodes)} node(s) exceed {limit:.0f} on the calibration input and "
                          f"stay in fp32: {', '.join(sorted(plan.fp32_nodes))}")
    return plan
