"""Packaging: writing and reading ``.mlpackage`` folders.

``writer.py`` writes a package atomically and deterministically (metadata, descriptions, deployment
target; temp folder then rename); ``reader.py`` is the read-only, contained way every stage opens a
package's spec (coremltools' ``MLModel(path)`` rewrites Manifest.json); ``stateful.py`` holds the facts
of stateful (prefill/decode, KV cache) packages; ``assets.py`` the files a package carries (tokenizer,
generation config); ``inspect.py`` describes any package.

The names people import are re-exported here lazily (no coremltools import until one is used)::

    from bitnet_coreml.package import read_package_spec, stateful_info
"""

from __future__ import annotations

from bitnet_coreml._lazy import lazy_exports

# public name -> module under bitnet_coreml.package that defines it
_EXPORTS: dict[str, str] = {
    "save_package": "writer", "describe": "writer", "package_files": "writer", "weight_bytes": "writer",
    "read_package_spec": "reader",
    "StatefulInfo": "stateful", "stateful_info": "stateful", "describe_package": "stateful",
    "check_position": "stateful", "PREFILL": "stateful", "DECODE": "stateful",
    "read_assets": "assets", "write_assets": "assets",
    "inspect_package": "inspect", "is_package": "inspect",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
