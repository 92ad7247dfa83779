"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

The order and arithmetic follow transformers' logits processors (repetition penalty, then
temperature, then top-k, then top-p), in float64 numpy. Randomness comes only from the
:class:`numpy.random.Generator` seeded with ``seed``, one uniform draw per sampled token, so the same
seed and the same logits give the same tokens on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitnet_coreml.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` (the default) is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    repetition_penalty: float = 1.0  # 1: none
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise InputError(f"--top-k {self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"--top-p {self.top_p}: must be in (0, 1]")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 is none)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks tokens with a :class:`SamplingConfig`; holds the seeded generator."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def scores(self, logits: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """The processed scores (float64, ``-inf`` for filtered tokens), before the softmax."""
        c = self.config
        s = np.asarray(logits, dtype=np.float64).reshape(-1).copy()
        if c.repetition_penalty != 1.0 and len(previous):
            seen = np.unique(np.asarray(previous, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < s.size)]
            v = s[seen]
            s[seen] = np.where(v < 0, v * c.repetition_penalty, v / c.repetition_penalty)
        if c.greedy:
            return s
        s = s / c.temperature
        if c.top_k and c.top_k < s.size:
            kth = np.partition(s, -c.top_k)[-c.top_k]
            s[s < kth] = -np.inf
        if c.top_p < 1.0:
            order = np.argsort(-s, kind="stable")
            p = _softmax(s[order])
            cum = np.cumsum(p)
            # keep the smallest prefix whose mass reaches top_p (always at least the best token)
            cut = int(np.searchsorted(cum, c.top_p, side="left")) + 1
            s[order[cut:]] = -np.inf
        return s

    def pick(self, logits: np.ndarray, previous: Sequence[int]) -> int:
        """The next token id."""
        s = self.scores(logits, previous)
        if self.config.greedy:
            return int(np.argmax(s))  # first index of the maximum, as torch.argmax
        p = _softmax(s)
        u = self._rng.random()
        idx = int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))
        return min(idx, p.size - 1)


def _softmax(s: np.ndarray) -> np.ndarray:
    m = np.max(s)
    e = np.exp(s - m)
    return e / e.sum()
