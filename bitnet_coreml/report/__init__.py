"""The conversion report: one offline HTML page (and its JSON) per package.

``collect(package, source=None, inputs=None)`` gathers the data (:mod:`.data`); ``write_html(data, path)``
draws it (:mod:`.html`, charts in :mod:`.charts`, matplotlib imported only there).
"""

from __future__ import annotations

from bitnet_coreml.report.data import collect
from bitnet_coreml.report.html import write_html

__all__ = ["collect", "write_html"]
