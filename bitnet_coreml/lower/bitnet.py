"""Lowerings of the fused BitNet ops (``bitnet_coreml::BitLinear``, ``RMSNorm``, ``Relu2``) to MIL.

BitLinear keeps the ternary codes at 2 bits: the int8 codes are packed straight into the indices of
a ``constexpr_lut_to_dense`` with the LUT ``{-1, 0, 1, 0}`` (index = code + 1), so no fp16/fp32
dense copy of a ternary weight is ever built. The per-tensor or per-channel multiplier ``Alpha`` is
applied after the matmul (the ANE prefers scales after a linear).

The activation quantisation is exact and fp16-safe::

    m  = maximum(reduce_max(|x|, -1), eps);  sx = Qp / m
    xq = clip(round_half_even(x * sx), Qn, Qp)    # fp16: round_half_even((x / m) * Qp)
    xn = xq * 2**-(act_bits-1)            # exact (power of two); |xn| <= 1, so the matmul sums to at most K
    y  = matmul(xn, W_lut^T) * (m * 2**(act_bits-1) / Qp) * Alpha

``(xq @ W^T) / sx * Alpha`` of the contract equals this exactly in real arithmetic; multiplying xq
by a power of two is exact in fp16, and keeping |xn| <= 1 stops the accumulation of ``127 * K``
from overflowing fp16's 65504 (it would for K > 516). In fp16 the row is divided by ``m`` before
the multiply by ``Qp``: ``sx`` itself is not representable once ``m < Qp/65504`` (an all-zero row,
``m = eps``, would give ``0 * inf = NaN``).

RMSNorm is computed on the row divided by its max-abs, with the epsilon rescaled to match, which is
the same function in real arithmetic but never squares a large value (x^2 overflows fp16 for
|x| > 256).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.errors import InputError, UnsupportedOpError
from bitnet_coreml.lower.ops.elementwise import round_half_even  # the one exact ties-to-even helper
from bitnet_coreml.lower.registry import LoweringContext, lowering
from bitnet_coreml.vocab import DOMAIN

# LUT of the 2-bit ternary weights: index = code + 1; index 3 is unused padding.
TERNARY_LUT = np.array([-1.0, 0.0, 1.0, 0.0], dtype=np.float32)
# Rows packed per step: bounds the temporary index buffer to a few MB whatever the weight's size.
_PACK_ROWS_BYTES = 1 << 24
# Smallest row max-abs RMSNorm divides by: fp16's smallest normal (keeps 1/m and eps/m^2 finite).
_RMS_MIN_SCALE = 2.0 ** -14


def _mb() -> Any:
    coremltools()
    from coremltools.converters.mil import Builder as mb

    return mb


def _fdt(x: Any) -> Any:
    """numpy float dtype of a MIL Var (fp16 when the program is built natively in fp16)."""
    from coremltools.converters.mil.mil import types

    dt = types.nptype_from_builtin(x.dtype)
    return dt if dt in (np.float16, np.float32) else np.float32


# --- 2-bit packing ---------------------------------------------------------------------------------


def pack_ternary_2bit(codes: np.ndarray) -> np.ndarray:
    """Pack int8 ternary codes (any shape, values in {-1, 0, 1}) into 2-bit LUT indices.

    Row-major element order, four indices per byte, least significant bits first (the layout of
    Core ML's ``constexpr_lut_to_dense``: element ``4j+i`` sits in bits ``2i..2i+1`` of byte ``j``).
    Index = code + 1, for the LUT ``[-1, 0, 1, 0]``. Works in row blocks so the temporaries stay
    small; the output is ``ceil(size / 4)`` bytes.
    """
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.dtype != np.int8:
        raise TypeError(f"ternary codes must be int8, got {flat.dtype}")
    n = flat.size
    out = np.zeros((n + 3) // 4, dtype=np.uint8)
    step = max(4, (_PACK_ROWS_BYTES // 4) * 4)
    for start in range(0, n, step):
        stop = min(n, start + step)
        chunk = flat[start:stop]
        idx = (chunk + np.int8(1)).view(np.uint8)
        if idx.size % 4:
            idx = np.concatenate([idx, np.zeros(4 - idx.size % 4, np.uint8)])
        q = idx.reshape(-1, 4)
        packed = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
        out[start // 4:start // 4 + packed.size] = packed
    return out


def check_ternary_codes(codes: np.ndarray, where: str) -> None:
    """Raise InputError unless ``codes`` is int8 with every value in {-1, 0, 1}."""
    if codes.dtype != np.int8:
        raise InputError(f"{where}: BitLinear weight must be int8 ternary codes, found dtype {codes.dtype}")
    if codes.size and (int(codes.min()) < -1 or int(codes.max()) > 1):
        raise InputError(
            f"{where}: BitLinear weight codes must be in {{-1, 0, 1}}, found range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )


def ternary_lut_weight(codes: np.ndarray, name: str, dtype: Any = np.float32, ios: int = 16) -> Any:
    """A MIL ``constexpr_lut_to_dense`` holding ``codes`` ([N, K] int8) as 2-bit indices.

    iOS16/17 form: packed uint8 ``indices``, 1-D ``lut``, explicit ``shape``. iOS18 form (the op was
    redefined): ``indices`` typed uint2 with the weight's shape (coremltools packs them when it
    serialises), ``lut`` of rank 4 ``[1, 1, 4, 1]`` (one LUT for the whole tensor, scalar entries).
    """
    mb = _mb()
    if ios >= 18:
        from coremltools.converters.mil.mil import types

        idx = (codes + np.int8(1)).view(np.uint8).astype(types.np_uint2_dtype)
        return mb.constexpr_lut_to_dense(indices=idx, lut=TERNARY_LUT.astype(dtype).reshape(1, 1, 4, 1), name=name)
    return mb.constexpr_lut_to_dense(
        indices=pack_ternary_2bit(codes),
        lut=TERNARY_LUT.astype(dtype),
        shape=np.array(codes.shape, dtype=np.uint32),
        name=name,
    )


def _lut_weight_from_indices(indices: np.ndarray, shape: tuple[int, ...], name: str, dtype: Any, ios: int,
                             shared: dict[Any, Any] | None = None) -> Any:
    """Like :func:`ternary_lut_weight`, from ready indices: packed bytes (iOS16/17) or uint8 ``[N, K]`` (iOS18)."""
    mb = _mb()
    if ios >= 18:
        from coremltools.converters.mil.mil import types

        idx = shared.get(("uint2", id(indices))) if shared is not None else None
        if idx is None:
            idx = indices.reshape(shape).astype(types.np_uint2_dtype)
            if shared is not None:
                shared[("uint2", id(indices))] = idx
        return mb.constexpr_lut_to_dense(indices=idx, lut=TERNARY_LUT.astype(dtype).reshape(1, 1, 4, 1), name=name)
    return mb.constexpr_lut_to_dense(indices=indices, lut=TERNARY_LUT.astype(dtype),
                                     shape=np.array(shape, dtype=np.uint32), name=name)


# --- lowerings -------------------------------------------------------------------------------------


def _attr(node: ir.Node, key: str, default: Any) -> Any:
    a = node.attributes.get(key)
    return default if a is None else a.value


@lowering("BitLinear", domain=DOMAIN, const_inputs=(1, 2))
def lower_bitlinear(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    mb = _mb()
    nm = ctx.name(node)
    x = ctx.input(node, 0)
    w_val = node.inputs[1]
    if w_val is None or w_val.const_value is None:
        raise UnsupportedOpError(
            f"node {node.name!r} (BitLinear): the weight must be an initializer of ternary codes, found a "
            "computed value"
        )
    tensor = w_val.const_value
    shape = tuple(int(d) for d in tensor.shape.numpy())
    if len(shape) != 2:
        raise InputError(f"node {node.name!r} (BitLinear): weight must be [N, K], found shape {list(shape)}")
    ios = int(ctx.options.get("ios", 16))
    # A checkpoint's ternary tensor hands out the 2-bit indices straight from its packed bytes (and
    # validates them): no int8 copy of the weight is made.
    lut_source = getattr(tensor, "lut2_bytes" if ios < 18 else "lut_indices", None)
    codes: np.ndarray | None = None
    if lut_source is None:
        codes = tensor.numpy()
        check_ternary_codes(codes, f"node {node.name!r}")
    alpha = np.asarray(ctx.const(node, 2), dtype=np.float64)
    n_out = shape[0]
    if alpha.size not in (1, n_out):
        raise InputError(
            f"node {node.name!r} (BitLinear): Alpha must be a scalar or have {n_out} entries (one per output "
            f"channel), found shape {list(alpha.shape)}"
        )
    act_bits = int(_attr(node, "act_bits", 8))
    eps = float(_attr(node, "act_eps", 1e-5))
    if isinstance(x, np.ndarray):
        x = mb.const(val=x.astype(np.float32), name=f"{nm}_x")

    f = _fdt(x)
    half = f == np.float16 or ctx.compute_precision == "fp16"

    def matmul(xn: Any, alpha_eff: np.ndarray, m: Any) -> list[Any]:
        return [_ternary_matmul(ctx, xn, w_val, shape, codes, lut_source, f, ios, alpha_eff, m, nm)]

    if act_bits == 0 and not half:  # weight-only ternary (no activation quantisation), fp32
        return matmul(x, alpha, None)
    ax = mb.abs(x=x, name=f"{nm}_abs")
    mx = mb.reduce_max(x=ax, axes=[-1], keep_dims=True, name=f"{nm}_absmax")
    m = mb.maximum(x=mx, y=f(eps), name=f"{nm}_m")
    if act_bits == 0:  # fp16: x / m (|x/m| <= 1) keeps the accumulation in range; m goes back in after
        return matmul(mb.real_div(x=x, y=m, name=f"{nm}_xn"), alpha, m)
    qp = 2.0 ** (act_bits - 1) - 1
    qn = -(2.0 ** (act_bits - 1))
    pow2 = 2.0 ** (act_bits - 1)
    if half:
        # x / m first (|x/m| <= 1), then * Qp: the scale Qp/m overflows fp16 once m < Qp/65504 ~ 0.0019,
        # and an all-zero row (m = eps, Qp/eps = 1.27e7 -> inf) would give 0 * inf = NaN.
        xs = mb.mul(x=mb.real_div(x=x, y=m, name=f"{nm}_xm"), y=f(qp), name=f"{nm}_xs")
    else:
        sx = mb.real_div(x=f(qp), y=m, name=f"{nm}_sx")
        xs = mb.mul(x=x, y=sx, name=f"{nm}_xs")
    xr = round_half_even(xs, f"{nm}_round")
    xq = mb.clip(x=xr, alpha=f(qn), beta=f(qp), name=f"{nm}_xq")
    xn = mb.mul(x=xq, y=f(1.0 / pow2), name=f"{nm}_xn")
    # The dequantisation factor 2^(b-1)/Qp is folded into Alpha so fp16 rounds one constant, not two.
    return matmul(xn, alpha * (pow2 / qp), m)


def _ternary_matmul(ctx: LoweringContext, xn: Any, w_val: ir.Value, shape: tuple[int, ...], codes: np.ndarray | None,
                    lut_source: Any, f: Any, ios: int, alpha: np.ndarray, m: Any, nm: str) -> Any:
    """``(xn @ W^T) * m * alpha`` with ``W`` a 2-bit LUT weight (``m`` None: ``* alpha`` only)."""
    mb = _mb()
    if codes is not None:
        w = ternary_lut_weight(codes, f"{nm}_w", f, ios)
    else:
        assert lut_source is not None
        # The functions of a multifunction build lower the same weights: unpack each once (lower/program.py)
        shared = ctx.options.get("shared")
        key = ("lut_indices", w_val.name, shape, ios)
        indices = shared.get(key) if shared is not None else None
        if indices is None:
            indices = lut_source()
            if shared is not None:
                shared[key] = indices
        w = _lut_weight_from_indices(indices, shape, f"{nm}_w", f, ios, shared)
    # matmul, not linear: linear always carries a bias, and a zero bias of N fp16 values per layer
    # would cost 8/K of the 2-bit weight bytes (0.8% at K=1024) for nothing.
    y = mb.matmul(x=xn, y=w, transpose_x=False, transpose_y=True, name=f"{nm}_mm")
    alpha_eff = np.asarray(alpha).astype(f)
    if m is None:
        return mb.mul(x=y, y=alpha_eff.reshape(()) if alpha.size == 1 else alpha_eff.reshape(-1), name=f"{nm}_y")
    if alpha.size == 1:
        scale = mb.mul(x=m, y=f(alpha_eff.reshape(())), name=f"{nm}_scale")
        return mb.mul(x=y, y=scale, name=f"{nm}_y")
    ys = mb.mul(x=y, y=m, name=f"{nm}_ys")
    return mb.mul(x=ys, y=alpha_eff.reshape(-1), name=f"{nm}_y")


@lowering("RMSNorm", domain=DOMAIN, const_inputs=(1,))
def lower_rmsnorm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    mb = _mb()
    nm = ctx.name(node)
    x = ctx.input(node, 0)
    if isinstance(x, np.ndarray):
        x = mb.const(val=x.astype(np.float32), name=f"{nm}_x")
    f = _fdt(x)
    gamma = np.asarray(ctx.const(node, 1)).astype(f)
    eps = float(_attr(node, "epsilon", 1e-5))
    # y = x/s / sqrt(mean((x/s)^2) + eps/s^2) * gamma, s = row max-abs: the same function, but the
    # squares are of values in [-1, 1].
    ax = mb.abs(x=x, name=f"{nm}_abs")
    s = mb.maximum(x=mb.reduce_max(x=ax, axes=[-1], keep_dims=True, name=f"{nm}_absmax"),
                   y=f(_RMS_MIN_SCALE), name=f"{nm}_s")
    r = mb.real_div(x=f(1.0), y=s, name=f"{nm}_r")
    xs = mb.mul(x=x, y=r, name=f"{nm}_xs")
    ms = mb.reduce_mean(x=mb.mul(x=xs, y=xs, name=f"{nm}_sq"), axes=[-1], keep_dims=True, name=f"{nm}_ms")
    # eps/s^2. When the fp16-safety analysis scaled this norm's input by t (and eps by t^2), use
    # u = r*t = 1/s_orig with the original eps: the same value, but eps stays representable in fp16
    # (eps*t^2 would underflow). If t itself underflows in fp16, eps/s_orig^2 is far below fp16's
    # resolution of mean(xs^2) >= 1/K anyway.
    t = float(ctx.options.get("rmsnorm_input_scale", {}).get(node.name, 1.0))
    u = r if t == 1.0 else mb.mul(x=r, y=f(t), name=f"{nm}_u")
    e = mb.mul(x=mb.mul(x=u, y=f(eps / (t * t)), name=f"{nm}_er"), y=u, name=f"{nm}_eps")
    inv = mb.rsqrt(x=mb.add(x=ms, y=e, name=f"{nm}_v"), name=f"{nm}_inv")
    xn = mb.mul(x=xs, y=inv, name=f"{nm}_xn")
    return [mb.mul(x=xn, y=gamma, name=f"{nm}_y")]


@lowering("Relu2", domain=DOMAIN)
def lower_relu2(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    mb = _mb()
    nm = ctx.name(node)
    x = ctx.input(node, 0)
    if isinstance(x, np.ndarray):
        r = np.maximum(x, 0)
        return [r * r]
    r = mb.relu(x=x, name=f"{nm}_relu")
    return [mb.mul(x=r, y=r, name=f"{nm}_y")]
