"""Cut a fused BitNet graph into consecutive pieces (``convert --chunks``) and decide how many a target needs.

The graph is seen as a row of *units*: unit 0 is the ``embedding`` group, unit ``i + 1`` decoder layer ``i``,
unit ``L + 1`` the ``head`` group (``bitnet_coreml.passes.layers`` is the one definition of the groups). A piece
is a run of consecutive units. The only activation that crosses a cut is the residual stream entering the
piece's first unit, ``hidden_states_<i>`` (the stream entering layer ``i``; ``hidden_states_<L>`` enters the
head), ``[1, S, H]``: fp16 in an fp16 package (fp32 in an fp32 one). convert() builds fp16 programs in fp16
(``lower/program.py`` ``native_fp16``), so a piece takes and returns the stream as the unchunked program holds
it, without a Cast (``cut_model``'s ``direct``; other callers get a Cast to the graph's float after the input
and back before the output): the pieces chained give the unchunked outputs bit for bit. Anything else a piece
reads from an earlier unit (RoPE rows and the causal mask a stateful graph computes from ``position``) is
recomputed inside the piece from the graph inputs; a graph whose cut needs any other value is refused.

``plan_chunks`` chooses where to cut: ``N`` pieces balanced by estimated weight bytes (the converter's size
estimate, ``check.size``), embedding and lm_head with the first / last layers or in their own piece, whichever
gives the smallest largest piece; ``auto``: the fewest pieces whose every piece fits the target's per-file
limit. ``check`` and ``convert`` both call it, so they suggest and choose the same count.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from bitnet_coreml.errors import CheckFailedError, InputError
from bitnet_coreml.passes.layers import EMBEDDING, HEAD, layer_groups, residual_points

__all__ = ["AUTO", "ChunkPlan", "Units", "boundary_name", "cut_model", "graph_units", "parse_chunks", "plan_chunks"]

AUTO = "auto"
STATES_KEY = "bitnet_coreml.states"  # (frontend.hf_stateful.STATES_KEY; read here without importing the frontend)


def boundary_name(layer: int) -> str:
    """The name of the residual stream entering decoder layer ``layer`` (``layer == L``: entering the head)."""
    return f"hidden_states_{layer}"


def parse_chunks(value: str | int | None) -> int | str | None:
    """``--chunks``: ``auto`` or a positive integer (None: not chunked)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--chunks {value!r}: expected auto or a positive number of pieces") from None
    if n < 1:
        raise InputError(f"--chunks {value!r}: expected auto or a positive number of pieces")
    return n


@dataclass(frozen=True)
class Units:
    """Which unit every node of a graph belongs to and the residual stream values between units."""

    layers: int
    unit_of: dict[int, int]  # id(node) -> unit index (0 embedding, 1..L layers, L+1 head)
    order: dict[int, int]  # id(node) -> position in the graph
    stream: dict[int, ir.Value]  # unit u (1..L+1) -> the residual stream value entering it
    stream_ancestors: frozenset[int]  # id() of the nodes the stream entering layer 0 is computed by

    @property
    def count(self) -> int:
        return self.layers + 2


def graph_units(graph: ir.Graph, what: str = "model") -> Units:
    """Units of a fused decoder graph (see the module docstring); an ``InputError`` when it has no decoder layers."""
    labels = layer_groups(graph)
    points = residual_points(graph)
    if not points or not all(p.layer.startswith("layer ") for p in points):
        raise InputError(f"{what}: cannot be cut into chunks: no decoder layers found (residual adds read through "
                         "RMSNorm, two per layer); --chunks needs a BitNet decoder graph")
    layers = len(points) // 2
    unit_of: dict[int, int] = {}
    order: dict[int, int] = {}
    for i, (node, label) in enumerate(zip(graph, labels, strict=True)):
        order[id(node)] = i
        unit_of[id(node)] = 0 if label == EMBEDDING else layers + 1 if label == HEAD else int(label.split()[1]) + 1
    adds = {p.node: p for p in points}
    add_nodes = [n for n in graph if n.name in adds]
    stream: dict[int, ir.Value] = {}
    first = add_nodes[0]
    entering = [v for v in first.inputs if v is not None and any(u.node.domain == "bitnet_coreml"
                                                                 and u.node.op_type == "RMSNorm" for u in v.uses())]
    if not entering:
        raise InputError(f"{what}: cannot be cut into chunks: the residual stream entering layer 0 is not found")
    stream[1] = entering[0]
    for i in range(1, layers + 1):
        stream[i + 1] = add_nodes[2 * i - 1].outputs[0]
    ancestors: set[int] = set()
    todo = [stream[1].producer()]
    while todo:
        n = todo.pop()
        if n is None or id(n) in ancestors:
            continue
        ancestors.add(id(n))
        todo += [v.producer() for v in n.inputs if v is not None]
    return Units(layers, unit_of, order, stream, frozenset(ancestors))


def _piece_nodes(graph: ir.Graph, units: Units, start: int, stop: int, what: str) -> list[ir.Node]:
    """The nodes of units ``[start, stop)`` plus the earlier nodes they recompute, in graph order."""
    own = [n for n in graph if start <= units.unit_of[id(n)] < stop]
    chosen = {id(n) for n in own}
    extra: dict[int, ir.Node] = {}
    entering = units.stream.get(start)
    todo = [v for n in own for v in n.inputs if v is not None]
    while todo:
        v = todo.pop()
        p = v.producer()
        if p is None or id(p) in chosen or id(p) in extra or (entering is not None and v is entering):
            continue
        u = units.unit_of[id(p)]
        if u >= stop:
            raise InputError(f"{what}: cannot be cut into chunks: node {p.name!r} of a later piece feeds an earlier one")
        if u != 0 or id(p) in units.stream_ancestors:
            raise InputError(f"{what}: cannot be cut into chunks before unit {start}: value {v.name!r} (node "
                             f"{p.name!r}) crosses the cut besides the residual stream")
        extra[id(p)] = p
        todo += [x for x in p.inputs if x is not None]
    return sorted([*own, *extra.values()], key=lambda n: units.order[id(n)])


def cut_model(model: ir.Model, units: Units, ranges: Sequence[tuple[int, int]], *, boundary: ir.DataType,
              what: str = "model", direct: Callable[[ir.Value], bool] | None = None) -> list[ir.Model]:
    """One model per unit range (consecutive, covering every unit); see the module docstring.

    ``direct(stream)``: the program builds that residual stream value in the boundary's dtype itself, so the
    piece takes and returns it as it is (no Cast in between: a Cast would change how the piece is built).
    The graph is not changed: nodes are cloned, constants share their (lazy) tensors.
    """
    direct = direct or (lambda _v: False)
    from onnx_ir._cloner import Cloner

    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != units.count or any(
            a[1] != b[0] or a[0] >= a[1] for a, b in zip(ranges, list(ranges[1:]) + [(units.count, units.count + 1)],
                                                        strict=True)):
        raise InputError(f"chunk ranges {list(ranges)} do not cover units 0..{units.count - 1} in order")
    graph = model.graph
    pieces = []
    for start, stop in ranges:
        nodes = _piece_nodes(graph, units, start, stop, what)
        g = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports=dict(graph.opset_imports), name=graph.name)
        vmap: dict[ir.Value, ir.Value | None] = {}
        if start > 0:
            src = units.stream[start]
            hidden = ir.Value(name=boundary_name(start - 1), type=ir.TensorType(boundary),
                              shape=ir.Shape(list(src.shape or [])))
            g.inputs.append(hidden)
            if boundary != src.dtype and not direct(src):
                cast = ir.node("Cast", [hidden], {"to": src.dtype}, name=f"{boundary_name(start - 1)}.cast_in")
                cast.outputs[0].name, cast.outputs[0].type = f"{hidden.name}_in", ir.TensorType(src.dtype)  # type: ignore[arg-type]
                cast.outputs[0].shape = ir.Shape(list(src.shape or []))
                g.append(cast)
                hidden = cast.outputs[0]
            vmap[src] = hidden
        used = {id(v) for n in nodes for v in n.inputs if v is not None}
        for v in graph.inputs:
            if id(v) in used:
                new = ir.Value(name=v.name, type=v.type, shape=ir.Shape(list(v.shape or [])) if v.shape is not None
                               else None)
                g.inputs.append(new)
                vmap[v] = new
        for name, v in graph.initializers.items():
            if id(v) in used and v not in vmap:
                new = ir.Value(name=name, type=v.type, shape=v.shape, const_value=v.const_value)
                g.register_initializer(new)
                vmap[v] = new
        cloner = Cloner(attr_map={}, value_map=vmap, metadata_props={})
        for n in nodes:
            g.append(cloner.clone_node(n))
        if stop == units.count:
            for o in graph.outputs:
                g.outputs.append(vmap[o])  # type: ignore[arg-type]
        else:
            out = vmap[units.stream[stop]]
            assert out is not None
            name = boundary_name(stop - 1)
            if boundary != out.dtype and not direct(units.stream[stop]):
                cast = ir.node("Cast", [out], {"to": boundary}, name=f"{name}.cast_out")
                g.append(cast)
                out = cast.outputs[0]
            out.name, out.type = name, ir.TensorType(boundary)
            out.shape = ir.Shape(list(units.stream[stop].shape or []))
            g.outputs.append(out)
        meta = dict(model.metadata_props)
        if STATES_KEY in meta:
            names = {v.name for v in g.inputs}
            meta[STATES_KEY] = json.dumps({k: s for k, s in json.loads(meta[STATES_KEY]).items() if k in names},
                                          sort_keys=True)
        pieces.append(ir.Model(g, ir_version=model.ir_version, producer_name=model.producer_name,
                               functions=list(model.functions.values()), metadata_props=meta,
                               doc_string=model.doc_string))
    return pieces


# --- planning -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """Where to cut: unit ranges, the estimated weight bytes of each piece and the per-file limit they meet."""

    layers: int
    ranges: tuple[tuple[int, int], ...]
    piece_bytes: tuple[int, ...]
    limit: int | None
    requested: int | str

    @property
    def count(self) -> int:
        return len(self.ranges)

    @property
    def fits(self) -> bool:
        return self.limit is None or all(b <= self.limit for b in self.piece_bytes)

    def describe(self, k: int) -> str:
        """``embedding + layers 0-14`` style label of piece ``k``."""
        a, b = self.ranges[k]
        parts = []
        if a == 0:
            parts.append("embedding")
        lo, hi = max(a, 1) - 1, min(b, self.layers + 1) - 1
        if hi > lo:
            parts.append(f"layer {lo}" if hi - lo == 1 else f"layers {lo}-{hi - 1}")
        if b == self.layers + 2:
            parts.append("lm_head")
        return " + ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "count": self.count, "layers": self.layers,
                "ranges": [list(r) for r in self.ranges], "piece_bytes": list(self.piece_bytes),
                "limit": self.limit, "fits": self.fits, "pieces": [self.describe(k) for k in range(self.count)]}


def unit_tensors(model: ir.Model, units: Units) -> list[set[str]]:
    """The initializer names every unit reads (with what it recomputes), per unit."""
    out: list[set[str]] = []
    for u in range(units.count):
        nodes = _piece_nodes(model.graph, units, u, u + 1, "model")
        out.append({v.name for n in nodes for v in n.inputs if v is not None and v.name and v.const_value is not None
                    and v.name in model.graph.initializers})
    return out


def _min_max_partition(w: list[int], parts: int, first: int, last: int) -> tuple[int, list[int]]:
    """Split ``w`` into ``parts`` consecutive non-empty runs minimising the largest run sum (``first`` added to
    the first run, ``last`` to the last); returns (that sum, the cut indices)."""
    n = len(w)
    pre = [0]
    for x in w:
        pre.append(pre[-1] + x)
    inf = float("inf")
    f = [[inf] * (n + 1) for _ in range(parts + 1)]
    arg = [[0] * (n + 1) for _ in range(parts + 1)]
    for i in range(1, n + 1):
        f[1][i] = pre[i] + first + (last if parts == 1 and i == n else 0)
    for j in range(2, parts + 1):
        for i in range(j, n + 1):
            extra = last if (j == parts and i == n) else 0
            for m in range(j - 1, i):
                c = max(f[j - 1][m], pre[i] - pre[m] + extra)
                if c < f[j][i]:
                    f[j][i], arg[j][i] = c, m
    cuts = []
    i = n
    for j in range(parts, 1, -1):
        i = arg[j][i]
        cuts.append(i)
    return int(f[parts][n]), sorted(cuts)


def _arrangements(layers: int, count: int) -> list[tuple[bool, bool, int]]:
    """(embedding alone, lm_head alone, layer pieces) for ``count`` pieces."""
    out = []
    for emb_own in (False, True):
        for head_own in (False, True):
            k = count - emb_own - head_own
            if 1 <= k <= layers:
                out.append((emb_own, head_own, k))
    return out


def plan_chunks(model: ir.Model, requested: int | str, *, limit: int | None,
                tensor_bytes: Callable[[set[str]], int], what: str = "model",
                units: Units | None = None) -> ChunkPlan:
    """Where to cut ``model`` into ``requested`` pieces (a number or ``auto``); see the module docstring.

    ``tensor_bytes(names)`` is the estimated weight-file bytes of a piece holding those initializers.
    """
    units = units or graph_units(model.graph, what)
    L = units.layers
    per_unit = unit_tensors(model, units)
    own = [tensor_bytes(s) for s in per_unit]

    def plan_for(count: int) -> ChunkPlan | None:
        best: tuple[int, tuple[tuple[int, int], ...]] | None = None
        for emb_own, head_own, k in _arrangements(L, count):
            _, cuts = _min_max_partition(own[1:L + 1], k, 0 if emb_own else own[0], 0 if head_own else own[L + 1])
            b = [1, *(1 + c for c in cuts), L + 1]
            rs = list(zip(b[:-1], b[1:], strict=True))
            rs = ([(0, 1)] + rs) if emb_own else [(0, rs[0][1])] + rs[1:]
            rs = (rs + [(L + 1, L + 2)]) if head_own else rs[:-1] + [(rs[-1][0], L + 2)]
            ranges = tuple(rs)
            sizes = [tensor_bytes(set().union(*per_unit[a:b])) for a, b in ranges]
            key = max(sizes)
            if best is None or key < best[0]:
                best = (key, ranges)
        if best is None:
            return None
        ranges = best[1]
        return ChunkPlan(L, ranges, tuple(tensor_bytes(set().union(*per_unit[a:b])) for a, b in ranges), limit,
                         requested)

    if requested != AUTO:
        n = int(requested)
        if n > L + 2:
            raise InputError(f"{what}: --chunks {n} is more pieces than the model has units ({L} decoder layers plus "
                             f"the embedding and the lm_head: at most {L + 2})")
        plan = plan_for(n)
        assert plan is not None
        return plan
    for n in range(1, L + 3):
        plan = plan_for(n)
        if plan is not None and plan.fits:
            return dataclass_replace(plan, requested=AUTO)
    worst = plan_for(L + 2)
    assert worst is not None
    raise CheckFailedError(f"{what}: does not fit the per-file limit {limit:,} B even in {L + 2} pieces (one per "
                           f"layer; the largest piece, {worst.describe(worst.piece_bytes.index(max(worst.piece_bytes)))}"
                           f", is {max(worst.piece_bytes):,} B); palettize with --embed-bits")


def dataclass_replace(plan: ChunkPlan, **changes: Any) -> ChunkPlan:
    import dataclasses

    return dataclasses.replace(plan, **changes)


def size_of_tensors(model: ir.Model, *, embed_bits: int | None, precision: str,
                    split_limit: int | None = None) -> Callable[[set[str]], int]:
    """``tensor_bytes`` for :func:`plan_chunks`: the weight-file bytes of a piece holding the named initializers,
    from the converter's size estimate of the whole model (``check.size``; ``split_limit`` defaults to the
    capability database's ``max_dimension``)."""
    from bitnet_coreml.check.size import blob_file_bytes, estimate_weight_bytes

    est = estimate_weight_bytes(model, embed_bits=embed_bits, precision=precision, split_limit=split_limit)
    blobs = {t.name: t.blobs for t in est.tensors}
    return lambda names: blob_file_bytes([b for n in sorted(names) for b in blobs.get(n, ())])
