"""Text generation over stateful packages: tokenizer, sampling, GenerationSession (``bitnet-coreml generate``)."""

from __future__ import annotations

from bitnet_coreml.generation.sampling import Sampler, SamplingConfig
from bitnet_coreml.generation.session import GenerationSession, GenerationStats
from bitnet_coreml.generation.tokenizer import TextStream, TextTokenizer

__all__ = ["GenerationSession", "GenerationStats", "Sampler", "SamplingConfig", "TextStream", "TextTokenizer"]
