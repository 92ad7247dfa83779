"""What ``convert`` needs of an imported ONNX graph beyond a valid import: fixed input shapes and
dtypes that Core ML has. (``inspect`` and ``check`` read such graphs as they are.)

**Dynamic input dimensions** (``convert --seq-len``).

Core ML packages here have one fixed input shape (the ANE wants static shapes; enumerated shapes
would multiply the compiled program). A graph exported with dynamic axes (``dynamic_shapes`` /
``dynamic_axes``: ``input_ids [batch, sequence]``) is therefore converted for one sequence length:

- a dynamic *leading* dimension of an input is the batch and becomes 1;
- every other dynamic dimension is the sequence and becomes ``seq_len``;
- a dimension name (``"sequence"``) keeps one value across all inputs and outputs.

Intermediate shapes the exporter recorded with those names are forgotten, so shape inference and
constant folding (the default passes) recompute them from the fixed inputs. Without ``seq_len`` the
converter refuses such a graph with one line naming the input and its dynamic dimensions.

**bfloat16 graphs** (``torch.onnx.export`` of a model in ``torch.bfloat16``: bfloat16 weights or
inputs) are refused: Core ML has no bfloat16 tensors, and ONNX Runtime's CPU kernels (the calibration
and ``verify`` oracle) cannot run them. Upcasting would compute something else than the source; export in float32 or float16.
"""

from __future__ import annotations

import onnx_ir as ir

from bitnet_coreml.errors import InputError

BATCH = 1


def dynamic_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs (not initializers) whose shape is unknown or has a non-integer dimension."""
    inits = model.graph.initializers
    # Sequence / optional inputs are not tensors at all: the lowering's refusals name those.
    return [v for v in model.graph.inputs
            if v.name not in inits and (v.type is None or isinstance(v.type, ir.TensorType))
            and (v.shape is None or not all(isinstance(d, int) for d in v.shape))]


def describe_input(v: ir.Value) -> str:
    """``'input_ids' [batch, sequence]`` for messages."""
    dims = "unknown rank" if v.shape is None else ", ".join(str(d) for d in v.shape)
    return f"{v.name!r} [{dims}]"


def fix_dynamic_inputs(model: ir.Model, seq_len: int, where: str) -> dict[str, int]:
    """Give every dynamic input dimension a value (see the module docstring), in place.

    Returns the chosen value per dimension name. Raises InputError for an input of unknown rank
    or a ``seq_len`` below 1.
    """
    if seq_len < 1:
        raise InputError(f"{where}: --seq-len {seq_len} is out of range; allowed: a positive number of tokens")
    values: dict[str, int] = {}
    changed = False
    for v in dynamic_inputs(model):
        if v.shape is None:
            raise InputError(f"{where}: graph input {v.name!r} has no shape (unknown rank); --seq-len cannot fix it: "
                             "re-export with shapes")
        dims: list[int] = []
        for axis, d in enumerate(v.shape):
            if isinstance(d, int):
                dims.append(d)
                continue
            key = str(d) if d.value is not None else f"{v.name}:{axis}"
            value = values.setdefault(key, BATCH if axis == 0 else seq_len)
            dims.append(value)
        v.shape = ir.Shape(dims)
        changed = True
    if not changed:
        return values
    for out in model.graph.outputs:
        if out.shape is not None and not all(isinstance(d, int) for d in out.shape):
            named = [values.get(str(d)) if not isinstance(d, int) and d.value is not None else d for d in out.shape]
            out.shape = ir.Shape(named) if all(isinstance(d, int) for d in named) else None  # type: ignore[arg-type]
    # Forget the exporter's symbolic intermediate shapes: shape inference recomputes them from the inputs.
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for o in node.outputs:
            if o not in outputs and o.shape is not None and not all(isinstance(d, int) for d in o.shape):
                o.shape = None
    return values


def _bfloat16_culprit(model: ir.Model) -> str | None:
    """The first bfloat16 graph input or initializer, named for a message (None: there is none).

    A float graph that only casts to bfloat16 somewhere is left to the lowering, which refuses the
    Cast node itself (``lower/ops/cast.py``); ONNX Runtime can still calibrate such a graph."""
    g = model.graph
    bf16 = ir.DataType.BFLOAT16

    def node_name(n: ir.Node) -> str:
        return f"node {(n.name or n.op_type)!r}"

    for v in g.inputs:
        if v.dtype == bf16:
            return f"graph input {v.name!r} is bfloat16"
    for v in g.initializers.values():
        if v.dtype == bf16 or (v.const_value is not None and v.const_value.dtype == bf16):
            users = [u.node for u in v.uses()]
            return (f"{node_name(users[0])} reads the bfloat16 initializer {v.name!r}" if users
                    else f"initializer {v.name!r} is bfloat16")
    return None


def refuse_bfloat16(model: ir.Model, where: str) -> None:
    """One InputError if the graph stores or computes values in bfloat16 (see the module docstring)."""
    culprit = _bfloat16_culprit(model)
    if culprit is not None:
        raise InputError(f"{where}: {culprit}; Core ML has no bfloat16 tensors: export the model in float32 "
                         "(or float16, .half())")
