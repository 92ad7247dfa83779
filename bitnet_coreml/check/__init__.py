"""check stage of the bitnet-coreml pipeline."""
