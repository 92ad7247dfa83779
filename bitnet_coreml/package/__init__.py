"""package stage of the bitnet-coreml pipeline."""
