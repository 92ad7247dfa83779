"""Render report data (:func:`bitnet_coreml.report.data.collect`) into one self-contained HTML file.

The page is a jinja2 template (``templates/report.html.j2``) with inline CSS and the charts as inline
SVG: it loads nothing else, runs no script, and works offline from disk. Written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitnet_coreml.report.data import unit_table

if TYPE_CHECKING:
    from bitnet_coreml.report.worker import ChartWorker


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n:,.2f} GB"


def _fmt_num(x: Any, digits: int = 6) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _fmt_pct(x: Any) -> str:
    return "-" if x is None or isinstance(x, str) else f"{100 * x:.1f}%"


def chart_jobs(data: Mapping[str, Any]) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """Every chart the data supports, by section: (function of :mod:`.charts`, its arguments).

    ``data`` may be partial (the sections :func:`~bitnet_coreml.report.data.collect` has made so far):
    a chart whose data is not there yet is left out.
    """
    out: dict[str, tuple[str, tuple[Any, ...]]] = {}
    kinds = data.get("summary", {}).get("bytes_by_kind")
    if kinds is not None:
        out["bytes"] = ("bytes_chart", (kinds,))
    size = data.get("size")
    if size is not None:
        out["memory"] = ("memory_chart", (size,))
        st = size.get("state")
        if st and st.get("bytes_per_token"):
            out["kv"] = ("kv_chart", (st, size.get("device_limit_bytes"), size["weight_bytes"]))
    if data.get("units", {}).get("available"):
        out["units"] = ("units_chart", (data["units"]["layers"],))
    fp = data.get("fp16", {})
    if fp.get("available"):
        out["fp16"] = ("headroom_chart", (fp["layers"], fp["fp16_max"], fp["limit"]))
    parity = data.get("parity", {})
    if parity.get("available") and parity["depth"]:
        out["parity"] = ("depth_chart", (parity["depth"],))
    timing = data.get("timing", {})
    if timing.get("available"):
        out["timing"] = ("timing_chart", (timing["by_family"], timing["outside_ops_seconds"]))
    return out


def charts(data: Mapping[str, Any], worker: ChartWorker | None = None) -> dict[str, str]:
    """Every chart the data supports, as inline SVG, by section: drawn by ``worker`` where it has, else here."""
    jobs = chart_jobs(data)
    drawn = worker.results(jobs) if worker is not None else {}
    if len(drawn) == len(jobs):
        return drawn
    from bitnet_coreml.report import charts as c

    return {name: drawn[name] if name in drawn else getattr(c, fn)(*args) for name, (fn, args) in jobs.items()}


def render(data: dict[str, Any], worker: ChartWorker | None = None) -> str:
    """The report page as a string (charts from ``worker`` where it drew them)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bitnet_coreml.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["bytes"] = _fmt_bytes
    env.filters["num"] = _fmt_num
    env.filters["pct"] = _fmt_pct
    tpl = env.get_template("report.html.j2")
    return tpl.render(d=data, charts=charts(data, worker), unit_table=unit_table(data["units"]))


def write_html(data: dict[str, Any], path: str | os.PathLike[str], worker: ChartWorker | None = None) -> Path:
    """Render ``data`` to ``path`` atomically (temp file + rename); returns the path. ``worker``: see :func:`charts`."""
    out = Path(path)
    html = render(data, worker)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
