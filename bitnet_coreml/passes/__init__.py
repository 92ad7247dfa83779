"""passes stage of the bitnet-coreml pipeline."""
