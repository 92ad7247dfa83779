"""frontend stage of the bitnet-coreml pipeline."""
