"""runtime stage of the bitnet-coreml pipeline."""
