"""Render report data (:func:`bitnet_coreml.report.data.collect`) into one self-contained HTML file.

The page is a jinja2 template (``templates/report.html.j2``) with inline CSS and the charts as inline
SVG: it loads nothing else, runs no script, and works offline from disk. Written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bitnet_coreml.report.data import unit_table


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


def charts(data: dict[str, Any]) -> dict[str, str]:
    """Every chart the data supports, as inline SVG, by section."""
    from bitnet_coreml.report import charts as c

    out = {"bytes": c.bytes_chart(data["summary"]["bytes_by_kind"]), "memory": c.memory_chart(data["size"])}
    if data["units"]["available"]:
        out["units"] = c.units_chart(data["units"]["layers"])
    fp = data["fp16"]
    if fp["available"]:
        out["fp16"] = c.headroom_chart(fp["layers"], fp["fp16_max"], fp["limit"])
    if data["parity"]["available"] and data["parity"]["depth"]:
        out["parity"] = c.depth_chart(data["parity"]["depth"])
    st = data["size"].get("state")
    if st and st.get("bytes_per_token"):
        out["kv"] = c.kv_chart(st, data["size"].get("device_limit_bytes"), data["size"]["weight_bytes"])
    if data["timing"].get("available"):
        out["timing"] = c.timing_chart(data["timing"]["by_family"], data["timing"]["outside_ops_seconds"])
    return out


def render(data: dict[str, Any]) -> str:
    """The report page as a string."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bitnet_coreml.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["bytes"] = _fmt_bytes
    env.filters["num"] = _fmt_num
    env.filters["pct"] = _fmt_pct
    tpl = env.get_template("report.html.j2")
    return tpl.render(d=data, charts=charts(data), unit_table=unit_table(data["units"]))


def write_html(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Render ``data`` to ``path`` atomically (temp file + rename); returns the path."""
    out = Path(path)
    html = render(data)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
