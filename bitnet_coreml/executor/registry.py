"""The op registry of the reference executor: one numpy implementation per MIL op type.

An implementation is ``fn(ctx, args) -> array | tuple[array, ...]`` where ``args`` maps the op's input
names to numpy values (fp16 tensors arrive as fp32: the executor computes in fp32 and rounds each
result to the op's declared MIL dtype afterwards) and ``ctx`` is the op's static :class:`OpContext`.
Optional inputs the op does not carry are absent from ``args``: implementations use ``args.get``
with the default the MIL op spec documents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitnet_coreml.errors import UnsupportedOpError

__all__ = ["OpContext", "OpImpl", "register", "lookup", "supported_ops", "is_registered"]


@dataclass(frozen=True)
class OpContext:
    """What an implementation may know about its op besides the runtime values."""

    name: str
    op_type: str
    out_dtypes: tuple[Any, ...]
    out_shapes: tuple[tuple[Any, ...] | None, ...]
    # Compiled nested blocks (cond / while_loop) and the callback that runs one; unused elsewhere.
    blocks: tuple[Any, ...] = ()
    run_block: Callable[..., Any] | None = field(default=None, compare=False)


# fn(ctx, args) -> outputs; control-flow ops (needs_env) also get the environment: fn(ctx, args, env)
OpImpl = Callable[..., Any]


@dataclass(frozen=True)
class _Entry:
    fn: OpImpl
    family: str
    # Ops with side effects or randomness must never be constant-folded at load time.
    pure: bool
    needs_env: bool


_REGISTRY: dict[str, _Entry] = {}


def register(*op_types: str, pure: bool = True, needs_env: bool = False) -> Callable[[OpImpl], OpImpl]:
    """Register ``fn`` as the implementation of each MIL op type in ``op_types``; refuses duplicates."""

    def deco(fn: OpImpl) -> OpImpl:
        family = fn.__module__.rsplit(".", 1)[-1]
        for op_type in op_types:
            if op_type in _REGISTRY:
                prev = _REGISTRY[op_type]
                raise ValueError(
                    f"MIL op {op_type!r} is already implemented by {prev.fn.__module__}.{prev.fn.__name__}; "
                    f"refusing a second implementation from {fn.__module__}.{fn.__name__}"
                )
            _REGISTRY[op_type] = _Entry(fn=fn, family=family, pure=pure, needs_env=needs_env)
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the package registers every op family; done lazily so registry users need not know.
    from bitnet_coreml.executor import ops  # noqa: F401


def is_registered(op_type: str) -> bool:
    """True when the executor implements ``op_type``."""
    _ensure_loaded()
    return op_type in _REGISTRY


def lookup(op_type: str, *, where: str = "") -> _Entry:
    """The registry entry for ``op_type``; :class:`UnsupportedOpError` listing what is supported on a miss."""
    _ensure_loaded()
    try:
        return _REGISTRY[op_type]
    except KeyError:
        raise UnsupportedOpError(
            f"{where + ': ' if where else ''}the reference executor has no implementation of MIL op "
            f"{op_type!r}; supported: {', '.join(supported_ops())}"
        ) from None


def supported_ops() -> list[str]:
    """Every MIL op type the executor implements (``const`` included), sorted."""
    _ensure_loaded()
    return sorted(set(_REGISTRY) | {"const"})


def op_families() -> dict[str, list[str]]:
    """Op family (the implementing module) -> the op types it implements."""
    _ensure_loaded()
    out: dict[str, list[str]] = {}
    for op_type, entry in sorted(_REGISTRY.items()):
        out.setdefault(entry.family, []).append(op_type)
    return out


def as_array(value: Any) -> np.ndarray:
    """``value`` as an ndarray (scalars become 0-d arrays)."""
    return value if isinstance(value, np.ndarray) else np.asarray(value)
