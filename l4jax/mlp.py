"""SwiGLU feed-forward: the dense layers and the MoE's shared expert."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh

INIT = nn.initializers.normal(0.02)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)). x [..., D]; gate, up [D, F]; down [F, D]."""
    g = jnp.einsum("...d,df->...f", x, gate)
    u = jnp.einsum("...d,df->...f", x, up)
    h = nn.with_logical_constraint(jax.nn.silu(g) * u, (sh.BATCH, sh.LENGTH, sh.ACT_MLP)[-x.ndim:])
    return jnp.einsum("...f,fd->...d", h, down)


class MLP(nn.Module):
    hidden: int  # F
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D = x.shape[-1]
        p = lambda name, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(INIT, axes), shape, self.param_dtype).astype(self.dtype)
        gate = p("gate", (D, self.hidden), (sh.EMBED, sh.MLP))  # "...d,df->...f"
        up = p("up", (D, self.hidden), (sh.EMBED, sh.MLP))      # "...d,df->...f"
        down = p("down", (self.hidden, D), (sh.MLP, sh.EMBED))  # "...f,fd->...d"
        return swiglu(x, gate, up, down)
