"""The report's charts: matplotlib figures rendered to inline SVG (no scripts, no external fonts or files).

matplotlib is imported here only, and this module only by the report, so other commands never pay
for it. Figures are bare ``matplotlib.figure.Figure`` objects (no pyplot, no GUI backend; Agg is forced
anyway) saved by the SVG writer; text stays text (``svg.fonttype = none``) so the page's own font
renders it; ids and metadata are fixed so identical data give identical SVG.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

UNIT_COLORS = {"ANE": "#2e7d32", "GPU": "#f9a825", "CPU": "#c62828"}
KIND_COLORS = {"ternary_2bit": "#1565c0", "embeddings": "#6a1b9a", "other": "#9e9e9e"}
_WIDTH = 7.2  # inches; the SVG scales to the page width


class _Charts:
    """``subplots`` like pyplot's, on a bare ``Figure`` (no pyplot, no GUI backend: only the SVG writer draws)."""

    @staticmethod
    def subplots(*args: Any, figsize: tuple[float, float], **kw: Any) -> tuple[Any, Any]:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure

        matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "bitnet-coreml-report",
                                    "font.family": "sans-serif", "font.size": 9, "axes.spines.top": False,
                                    "axes.spines.right": False})
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.subplots(*args, **kw)


def _plt() -> _Charts:
    return _Charts()


def warm_up() -> None:
    """Import what drawing needs (matplotlib, its SVG writer, the font list) before the first chart is asked for."""
    import importlib

    import matplotlib

    matplotlib.use("Agg", force=True)
    for name in ("figure", "backends.backend_svg", "collections", "patches", "ticker", "font_manager"):
        importlib.import_module(f"matplotlib.{name}")


_SUPERSCRIPT = str.maketrans("-0123456789.", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u00b7")


def plain_log_label(label: str) -> str:
    """matplotlib's log-axis label (mathtext: ``$\\mathdefault{2\\times10^{-3}}$``) as plain Unicode text
    (``2×10⁻³``); a label it cannot rewrite stays mathtext. Parsing mathtext was 40% of drawing the charts."""
    m = re.fullmatch(r"\$\\mathdefault\{(.*)\}\$", label)
    if m is None:
        return label
    body = m.group(1).replace("\\times", "\u00d7")
    body = re.sub(r"\^\{(-?[0-9.]+)\}", lambda e: e.group(1).translate(_SUPERSCRIPT), body)
    return label if re.search(r"[\\{}^$]", body) else body


def _log_axis(ax: Any, which: str, base: float = 10) -> None:
    """A log scale on ``ax``'s ``which`` ("x" or "y") axis whose tick labels are plain text (:func:`plain_log_label`)."""
    from matplotlib.ticker import LogFormatterSciNotation

    class _Plain(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return plain_log_label(super().__call__(x, pos))

    getattr(ax, f"set_{which}scale")("log", base=base)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(_Plain(base=base))
    axis.set_minor_formatter(_Plain(base=base, labelOnlyBase=False))


def _no_minor(ax: Any) -> None:
    """Log axes draw dozens of minor ticks per decade; the charts read fine without them (and draw faster)."""
    from matplotlib.ticker import NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())


def to_svg(fig: Any, title: str) -> str:
    """The figure as an inline ``<svg>`` element (XML prolog and doctype dropped), with an accessible title."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1', svg, count=1)
    esc = title.replace("&", "&amp;").replace("<", "&lt;")
    return svg.replace(">", f' role="img" class="plot"><title>{esc}</title>', 1)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def bytes_chart(kinds: Mapping[str, Any]) -> str:
    """One stacked bar: package bytes by kind."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(_WIDTH, 1.0))
    left = 0.0
    total = max(1, kinds["total"])
    bits = "/".join(str(b) for b in kinds.get("embedding_bits", [])) or "-"
    labels = {"ternary_2bit": "ternary weights (2-bit)", "embeddings": f"embeddings / LM head ({bits}-bit)",
              "other": "other (scales, norms, program)"}
    for key in ("ternary_2bit", "embeddings", "other"):
        v = kinds[key]
        ax.barh([0], [v], left=left, color=KIND_COLORS[key], label=f"{labels[key]}: {_human(v)}")
        if v / total > 0.08:
            ax.text(left + v / 2, 0, f"{100 * v / total:.0f}%", ha="center", va="center", color="white")
        left += v
    ax.set_yticks([])
    ax.set_xlim(0, total)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _human(v)))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=8)
    return to_svg(fig, "Package bytes by kind")


UNIT_GRID_ID = "unit-grid"  # the <g> of the compute-unit cells; the page's CSS outlines the hovered cell


def cell_title(layer: str, op: Mapping[str, Any]) -> str:
    """The hover text of one compute-unit cell."""
    return f"{layer}: {op['node']} ({op['op_type']}) on {op['unit']}: {op['reason']}"


def units_chart(layers: Sequence[Mapping[str, Any]]) -> str:
    """A grid: one row per layer, one cell per op in graph order, coloured by its expected compute unit.

    Every cell carries its op and the reason for its unit as an SVG ``<title>`` (the browser shows it
    on hover; no script): the cells are one collection drawn in a known order, and their ``<path>``
    elements get the titles in that order."""
    plt = _plt()
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    cells, colors, titles = [], [], []
    for i, row in enumerate(layers):
        for j, op in enumerate(row["ops"]):
            if op["unit"] in UNIT_COLORS:
                cells.append([(j, i), (j + 1, i), (j + 1, i + 1), (j, i + 1)])
                colors.append(UNIT_COLORS[op["unit"]])
                titles.append(cell_title(row["layer"], op))
    width = max(len(r["ops"]) for r in layers)
    fig, ax = plt.subplots(figsize=(_WIDTH, 0.6 + 0.22 * len(layers)))
    grid = PolyCollection(cells, facecolors=colors, edgecolors="white", linewidths=0.3)
    grid.set_gid(UNIT_GRID_ID)
    ax.add_collection(grid)
    ax.set_xlim(0, width)
    ax.set_ylim(len(layers), 0)
    ax.set_yticks(np.arange(len(layers)) + 0.5, [r["layer"] for r in layers])
    ax.set_xlabel("ops of the layer, in graph order (hover a cell for its reason)")
    ax.legend(handles=[Patch(color=c, label=u) for u, c in UNIT_COLORS.items()], loc="lower center",
              bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    return _titled_cells(to_svg(fig, "Expected compute unit of every op, per layer"), UNIT_GRID_ID, titles)


def _titled_cells(svg: str, gid: str, titles: Sequence[str]) -> str:
    """Give the k-th ``<path>`` of the group ``gid`` the k-th title (as a ``<title>`` child)."""
    start = svg.index(f'<g id="{gid}">')
    end = svg.index("</g>", start)
    it = iter(titles)

    def titled(m: re.Match[str]) -> str:
        return f"<path {m.group(1)}><title>{html.escape(next(it), quote=False)}</title></path>"

    group, n = re.subn(r"<path ([^>]*?)/>", titled, svg[start:end])
    if n != len(titles):
        raise RuntimeError(f"the compute-unit chart drew {n} cells for {len(titles)} ops")
    return svg[:start] + group + svg[end:]


def headroom_chart(layers: Sequence[Mapping[str, Any]], fp16_max: float, limit: float) -> str:
    """Per layer: largest |activation| on the calibration input against fp16's maximum (log scale)."""
    plt = _plt()
    import numpy as np

    def num(x: Any) -> float:
        return float("inf") if x == "inf" else float(x or 0.0)

    before = [num(r["max_abs"]) for r in layers]
    after = [num(r["max_abs_after"]) for r in layers]
    y = np.arange(len(layers))
    cap = fp16_max * 4
    fig, ax = plt.subplots(figsize=(_WIDTH, 0.8 + 0.28 * len(layers)))
    ax.barh(y, [min(max(b, 1e-3), cap) for b in before], color="#90caf9", label="source (before rescaling)")
    ax.barh(y, [min(max(a, 1e-3), cap) for a in after], height=0.4, color="#0d47a1", label="in the package")
    ax.axvline(fp16_max, color="#c62828", linewidth=1.2, label=f"fp16 maximum {fp16_max:g}")
    ax.axvline(limit, color="#ef6c00", linestyle="--", linewidth=1, label=f"safety limit {limit:g}")
    for i, r in enumerate(layers):
        marks = []
        if r.get("rescaled"):
            marks.append(f"rescaled x{len(r['rescaled'])}")
        if r.get("fp32_nodes"):
            marks.append(f"{len(r['fp32_nodes'])} op(s) kept fp32")
        if marks:
            ax.text(min(max(before[i], 1e-3), cap) * 1.15, i, ", ".join(marks), va="center", fontsize=8)
    _log_axis(ax, "x")
    _no_minor(ax)
    ax.set_yticks(y, [r["layer"] for r in layers])
    ax.invert_yaxis()
    ax.set_xlabel("largest |value| (log scale)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=8)
    return to_svg(fig, "fp16 headroom per layer")


def depth_chart(depth: Sequence[Mapping[str, Any]]) -> str:
    """Error growth through the layers: 1 - cosine and max |difference| at each residual point (log scale)."""
    plt = _plt()
    x = list(range(len(depth)))
    one_minus = [max(1e-12, 1.0 - float(d["cosine"])) for d in depth]
    mx = [max(1e-12, float(d["max_abs"])) for d in depth]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(_WIDTH, 2.8))
    a1.plot(x, one_minus, marker="o", color="#1565c0")
    _log_axis(a1, "y")
    a1.set_title("1 - cosine (lower is better)", fontsize=9)
    a2.plot(x, mx, marker="o", color="#6a1b9a")
    _log_axis(a2, "y")
    a2.set_title("largest |difference| (lower is better)", fontsize=9)
    step = max(1, math.ceil(len(depth) / 12))
    for ax in (a1, a2):  # minor ticks kept: the values often sit inside one decade
        ax.set_xticks(x[::step], [d["label"].replace(" attention", " attn") for d in depth][::step],
                      rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    return to_svg(fig, "Parity by depth")


def memory_chart(size: Mapping[str, Any]) -> str:
    """Weights, peak activations and state (KV cache) stacked, against the device's memory limit."""
    plt = _plt()
    parts = [("weights (as stored)", size["weight_bytes"], "#1565c0"),
             ("activations (peak)", size["activation_peak_bytes"], "#ef6c00")]
    if size.get("state"):
        parts.append(("KV cache (state)", size["state"]["bytes"], "#6a1b9a"))
    fig, ax = plt.subplots(figsize=(_WIDTH, 1.0))
    left = 0
    for label, v, color in parts:
        ax.barh([0], [v], left=left, color=color, label=f"{label}: {_human(v)}")
        left += v
    limit = size.get("device_limit_bytes")
    if limit:
        ax.axvline(limit, color="#c62828", linewidth=1.5, label=f"{size.get('device')} limit: {_human(limit)}")
        _log_axis(ax, "x")
        _no_minor(ax)
        ax.set_xlim(max(1, min(v for _, v, _ in parts if v) / 2), max(limit, left) * 1.5)
    ax.set_yticks([])
    ax.set_xlabel("bytes" + (" (log scale)" if limit else ""))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=8)
    return to_svg(fig, "Peak memory estimate")


def kv_chart(state: Mapping[str, Any], limit: int | None, weights: int) -> str:
    """KV cache bytes against context length (linear in it), with the package's context marked."""
    plt = _plt()
    ctx = state["context_length"]
    per = state["bytes_per_token"]
    xs = [2 ** k for k in range(6, 18)]
    fig, ax = plt.subplots(figsize=(_WIDTH, 2.4))
    ax.plot(xs, [weights + per * x for x in xs], color="#6a1b9a", label="weights + KV cache")
    ax.axvline(ctx, color="#555", linestyle=":", label=f"this package: {ctx} tokens")
    if limit:
        ax.axhline(limit, color="#c62828", label=f"device limit {_human(limit)}")
    _log_axis(ax, "x", base=2)
    _log_axis(ax, "y")
    _no_minor(ax)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("bytes")
    ax.legend(frameon=False, fontsize=8)
    return to_svg(fig, "KV cache against context length")


def timing_chart(by_family: Mapping[str, float], outside: float) -> str:
    """Reference-executor time per op family (one call), largest first."""
    plt = _plt()
    items = list(by_family.items()) + [("outside ops (rounding, bookkeeping)", outside)]
    items.sort(key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(_WIDTH, 0.6 + 0.3 * len(items)))
    ax.barh([k for k, _ in items], [v * 1000 for _, v in items], color="#00838f")
    for i, (_, v) in enumerate(items):
        ax.text(v * 1000, i, f" {v * 1000:.2f} ms", va="center", fontsize=8)
    ax.set_xlabel("milliseconds")
    return to_svg(fig, "Executor time by op family")
