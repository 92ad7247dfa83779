"""Matrix products: MatMul, Gemm and Einsum (one or two operands, as transposes + one batched matmul)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitnet_coreml.lower.ops._common import (
    as_dtype,
    attr,
    bad,
    is_const,
    mb,
    mil_array,
    np_dtype,
    rank_of,
    req,
    static_shape,
    to_var,
    unsupported,
)
from bitnet_coreml.lower.registry import LoweringContext, lowering


def _same_dtype(a: Any, b: Any) -> tuple[Any, Any]:
    if is_const(a) and not is_const(b):
        a = as_dtype(a, np_dtype(b))
    if is_const(b) and not is_const(a):
        b = as_dtype(b, np_dtype(a))
    return a, b


@lowering("MatMul")
def matmul(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    a, b = req(ctx, node, 0), req(ctx, node, 1)
    if is_const(a) and is_const(b):
        return [np.matmul(np.asarray(a), np.asarray(b))]
    a, b = _same_dtype(a, b)
    nm = ctx.name(node)
    ra, rb = rank_of(a), rank_of(b)
    if ra >= 2 and rb >= 2:
        return [mb().matmul(x=to_var(a), y=to_var(b), name=nm)]
    # numpy's 1-D rules: a vector operand gets a unit dim (prepended for a, appended for b) that the
    # result then drops. MIL matmul wants rank >= 2 on both sides.
    m = mb()
    x = np.expand_dims(a, 0) if is_const(a) and ra == 1 else (
        m.expand_dims(x=a, axes=[0], name=f"{nm}_a2") if ra == 1 else a)
    y = np.expand_dims(b, -1) if is_const(b) and rb == 1 else (
        m.expand_dims(x=b, axes=[-1], name=f"{nm}_b2") if rb == 1 else b)
    mm = m.matmul(x=to_var(x), y=to_var(y), name=f"{nm}_mm")
    drop = ([-2] if ra == 1 else []) + ([-1] if rb == 1 else [])
    r_out = max(ra, rb, 2)
    axes = sorted(d + r_out for d in drop)
    if ra == 1 and rb == 1:
        return [m.reshape(x=mm, shape=np.array([], np.int32), name=nm)]
    return [m.squeeze(x=mm, axes=axes, name=nm)]


@lowering("Gemm")
def gemm(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    a, b, c = req(ctx, node, 0), req(ctx, node, 1), ctx.input(node, 2)
    alpha = float(attr(node, "alpha", 1.0))
    beta = float(attr(node, "beta", 1.0))
    ta, tb = bool(attr(node, "transA", 0)), bool(attr(node, "transB", 0))
    for i, v in enumerate((a, b)):
        if rank_of(v) != 2:
            raise bad(node, f"input {i} must be 2-D, found rank {rank_of(v)}")
    nm = ctx.name(node)
    if is_const(a) and is_const(b) and (c is None or is_const(c)):
        aa = np.asarray(a).T if ta else np.asarray(a)
        bb = np.asarray(b).T if tb else np.asarray(b)
        y = alpha * (aa @ bb)
        if c is not None:
            y = y + beta * np.asarray(c)
        return [y.astype(np.asarray(a).dtype)]
    a, b = _same_dtype(a, b)
    dt = np_dtype(a)
    m = mb()
    y = m.matmul(x=to_var(a), y=to_var(b), transpose_x=ta, transpose_y=tb,
                 name=nm if (alpha == 1.0 and (c is None or beta == 0.0)) else f"{nm}_mm")
    if alpha != 1.0:
        y = m.mul(x=y, y=np.asarray(alpha, dt), name=nm if (c is None or beta == 0.0) else f"{nm}_alpha")
    if c is not None and beta != 0.0:
        if is_const(c):
            y = m.add(x=y, y=mil_array((beta * np.asarray(c)).astype(dt)), name=nm)
        else:
            cb = c if beta == 1.0 else m.mul(x=c, y=np.asarray(beta, dt), name=f"{nm}_beta")
            y = m.add(x=y, y=cb, name=nm)
    return [y]


# --- Einsum: one or two operands, no repeated index within an operand --------------------------------


def _einsum_terms(node: ir.Node, equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Operand and output index strings with any ``...`` spelled out as fresh capital letters."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise bad(node, f"equation {equation!r} has {len(terms)} operands, the node has {len(ranks)}")
    n_ell = 0
    for t, r in zip(terms, ranks, strict=True):
        if "..." in t:
            n_ell = max(n_ell, r - (len(t) - 3))
    ell = "".join(chr(ord("A") + i) for i in range(n_ell))
    out_terms = []
    for t, r in zip(terms, ranks, strict=True):
        if "..." in t:
            k = r - (len(t) - 3)
            t = t.replace("...", ell[n_ell - k:])
        out_terms.append(t)
    if arrow:
        out = rhs.replace("...", ell)
    else:
        counts: dict[str, int] = {}
        for t in out_terms:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return out_terms, out


def _sum_out(x: Any, term: str, keep: set[str], name: str) -> tuple[Any, str]:
    axes = [i for i, c in enumerate(term) if c not in keep]
    if not axes:
        return x, term
    y = mb().reduce_sum(x=x, axes=axes, keep_dims=False, name=name)
    return y, "".join(c for c in term if c in keep)


def _permute(x: Any, term: str, order: str, name: str) -> Any:
    perm = [term.index(c) for c in order]
    return x if perm == list(range(len(perm))) else mb().transpose(x=x, perm=perm, name=name)


def _take_diagonals(node: ir.Node, x: Any, term: str, name: str) -> tuple[Any, str]:
    """Resolve an index repeated within one term (``ii``) by masking with an identity and summing."""
    m = mb()
    while len(set(term)) != len(term):
        c = next(ch for ch in term if term.count(ch) > 1)
        p = term.index(c)
        q = term.index(c, p + 1)
        s = static_shape(node, x)
        if s[p] != s[q]:
            raise bad(node, f"index {c!r} has sizes {s[p]} and {s[q]}")
        eye_shape = [1] * len(s)
        eye_shape[p], eye_shape[q] = s[p], s[q]
        eye = np.eye(s[p], dtype=np_dtype(x)).reshape(eye_shape)
        x = m.reduce_sum(x=m.mul(x=x, y=eye, name=f"{name}_{p}{q}m"), axes=[q], keep_dims=False,
                         name=f"{name}_{p}{q}")
        term = term[:q] + term[q + 1:]
    return x, term


@lowering("Einsum")
def einsum(ctx: LoweringContext, node: ir.Node) -> Sequence[Any]:
    vals = [req(ctx, node, i) for i in range(len(node.inputs))]
    equation = str(attr(node, "equation"))
    if all(is_const(v) for v in vals):
        return [np.asarray(np.einsum(equation, *[np.asarray(v) for v in vals]))]
    if len(vals) > 2:
        raise unsupported(node, f"{len(vals)} operands (supported: 1 or 2)")
    terms, out = _einsum_terms(node, equation, [rank_of(v) for v in vals])
    if len(set(out)) != len(out):
        raise unsupported(node, f"equation {equation!r} repeats an index in the output")
    nm = ctx.name(node)
    m = mb()
    vals = list(vals)
    for k, t in enumerate(terms):
        vals[k], terms[k] = _take_diagonals(node, to_var(vals[k]), t, f"{nm}_diag{k}")
    if len(vals) == 1:
        x, t = _sum_out(to_var(vals[0]), terms[0], set(out), f"{nm}_sum")
        return [_permute(x, t, out, nm) if t != out else m.identity(x=x, name=nm)]
    a, b = _same_dtype(vals[0], vals[1])
    a, b = to_var(a), to_var(b)
    ta, tb = terms
    # Indices in one operand only and not in the output are summed away first.
    a, ta = _sum_out(a, ta, set(tb) | set(out), f"{nm}_asum")
    b, tb = _sum_out(b, tb, set(ta) | set(out), f"{nm}_bsum")
    sa, sb = dict(zip(ta, static_shape(node, a), strict=True)), dict(zip(tb, static_shape(node, b), strict=True))
    batch = "".join(c for c in out if c in ta and c in tb)
    contract = "".join(c for c in ta if c in tb and c not in out)
    a_only = "".join(c for c in ta if c not in tb)
    b_only = "".join(c for c in tb if c not in ta)
    if any(sa[c] != sb[c] for c in batch + contract):
        raise unsupported(node, f"equation {equation!r} broadcasts a shared index")
    size = {**sa, **sb}

    def prod(idx: str) -> int:
        return int(np.prod([size[c] for c in idx])) if idx else 1

    a3 = m.reshape(x=_permute(a, ta, batch + a_only + contract, f"{nm}_at"),
                   shape=np.array([prod(batch), prod(a_only), prod(contract)], np.int32), name=f"{nm}_a3")
    b3 = m.reshape(x=_permute(b, tb, batch + contract + b_only, f"{nm}_bt"),
                   shape=np.array([prod(batch), prod(contract), prod(b_only)], np.int32), name=f"{nm}_b3")
    y = m.matmul(x=a3, y=b3, name=f"{nm}_mm")
    cur = batch + a_only + b_only
    y = m.reshape(x=y, shape=np.array([size[c] for c in cur], np.int32), name=f"{nm}_full" if cur != out else nm)
    return [y if cur == out else _permute(y, cur, out, nm)]
