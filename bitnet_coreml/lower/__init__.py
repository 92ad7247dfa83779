"""lower stage of the bitnet-coreml pipeline."""
