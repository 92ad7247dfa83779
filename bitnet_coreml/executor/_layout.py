"""The fused decode's instruction layout: one fact shared by ``executor/fused.py`` and both kernels.

``executor/fused.py`` writes a table of instructions, one row of :data:`WIDTH` int64 per op;
``executor/_vm.py`` (numba) and ``executor/_vm.c`` (C, built by ``executor/native.py``) run it. This
module holds the row layout, the opcodes, the output roundings and the error codes, and nothing that
needs numba: the C kernel gets the same numbers from a header generated from this module at build
time (:func:`c_header`).
"""

from __future__ import annotations

# --- instruction layout ------------------------------------------------------------------------
WIDTH = 40
OP, RND = 0, 1
D = 2  # output shape, 4 dims (D..D+3)
OUT, A, B, C = 6, 12, 18, 24  # operands: buffer, offset, 4 strides
P = 30  # 10 integer parameters (P + 8: the contiguous fast path, P + 9: bits of an unsigned output)

# rounding of the output
R_NONE, R_F16, R_INT, R_BOOL, R_UINT = 0, 1, 2, 3, 4

# opcodes
(ADD, SUB, MUL, DIV, MAX, MIN, EQ, NE, LT, LE, GT, GE, AND, OR, XOR,  # binary
 ABS, FLOOR, CEIL, RELU, RSQRT, COPY, SQRT, EXP, NEG, SIGMOID, SILU, SQUARE, NOT, TRUNC,  # unary
 SELECT, CLIP,  # ternary
 RMAX, RMEAN, RSUM, RMIN, SOFTMAX,  # last-axis reductions
 MM_TERN, MM_HALF, MATMUL, GATHER_HALF, GATHER, SCATTER) = range(42)
BINARY_LAST, UNARY_LAST, TERNARY_LAST = XOR, TRUNC, CLIP

# errors returned by the kernels
E_OK, E_INDEX, E_SLICE = 0, 1, 2

_NAMES = ("WIDTH", "OP", "RND", "D", "OUT", "A", "B", "C", "P",
          "R_NONE", "R_F16", "R_INT", "R_BOOL", "R_UINT",
          "ADD", "SUB", "MUL", "DIV", "MAX", "MIN", "EQ", "NE", "LT", "LE", "GT", "GE", "AND", "OR", "XOR",
          "ABS", "FLOOR", "CEIL", "RELU", "RSQRT", "COPY", "SQRT", "EXP", "NEG", "SIGMOID", "SILU", "SQUARE",
          "NOT", "TRUNC", "SELECT", "CLIP", "RMAX", "RMEAN", "RSUM", "RMIN", "SOFTMAX",
          "MM_TERN", "MM_HALF", "MATMUL", "GATHER_HALF", "GATHER", "SCATTER",
          "BINARY_LAST", "UNARY_LAST", "TERNARY_LAST", "E_OK", "E_INDEX", "E_SLICE")


def constants() -> dict[str, int]:
    """Every constant of the layout by name (the C header's ``VM_<NAME>`` macros)."""
    return {name: int(globals()[name]) for name in _NAMES}


def c_header() -> str:
    """The C header ``executor/_vm.c`` includes: one ``#define VM_<NAME> <value>`` per constant."""
    lines = ["/* generated from bitnet_coreml/executor/_layout.py by executor/native.py: do not edit */"]
    lines += [f"#define VM_{name} {value}" for name, value in constants().items()]
    return "\n".join(lines) + "\n"
