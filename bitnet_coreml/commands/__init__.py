"""One module per CLI command; :mod:`bitnet_coreml.cli` imports them lazily."""
