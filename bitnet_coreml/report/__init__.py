"""The conversion report: one offline HTML page (and its JSON) per package.

``collect(package, source=None, inputs=None)`` gathers the data (:mod:`.data`); ``write_html(data, path)``
draws it (:mod:`.html`, charts in :mod:`.charts`, matplotlib imported only there). ``ChartWorker``
(:mod:`.worker`) draws the charts in a child process while ``collect`` runs. The names are re-exported
lazily, so the chart process imports only what drawing needs.
"""

from __future__ import annotations

from bitnet_coreml._lazy import lazy_exports

_EXPORTS: dict[str, str] = {"collect": "data", "write_html": "html", "ChartWorker": "worker"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
