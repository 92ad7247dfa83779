"""``cond`` and ``while_loop``: nested blocks compiled like the main function, run on the same environment."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitnet_coreml.executor.registry import OpContext, register

_MAX_ITERATIONS = 10_000_000


@register("cond", pure=False, needs_env=True)
def op_cond(ctx: OpContext, a: dict[str, Any], env: list[Any]) -> Any:
    assert ctx.run_block is not None
    block = ctx.blocks[0] if bool(np.asarray(a["pred"]).reshape(-1)[0]) else ctx.blocks[1]
    return tuple(ctx.run_block(block, env))


@register("while_loop", pure=False, needs_env=True)
def op_while_loop(ctx: OpContext, a: dict[str, Any], env: list[Any]) -> Any:
    assert ctx.run_block is not None
    cond_block, body_block = ctx.blocks
    values = tuple(a["loop_vars"])
    for _ in range(_MAX_ITERATIONS):
        (go,) = ctx.run_block(cond_block, env, values)
        if not bool(np.asarray(go).reshape(-1)[0]):
            return values
        values = tuple(ctx.run_block(body_block, env, values))
    raise RuntimeError(f"while_loop {ctx.name!r} did not finish after {_MAX_ITERATIONS} iterations")
