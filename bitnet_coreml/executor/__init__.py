"""executor stage of the bitnet-coreml pipeline."""
