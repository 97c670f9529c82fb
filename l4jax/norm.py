"""RMSNorm, weighted (layer norms) and weightless (Llama 4's "L2Norm" QK-norm)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, computed in fp32 and cast back to x.dtype.

    This is also the QK-norm: HF calls it ``Llama4TextL2Norm`` but it is a weightless RMS norm per head.
    """
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """Weighted RMSNorm. The reference casts back to the input dtype *before* multiplying by the weight."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (sh.NORM,)),
                           (x.shape[-1],), self.param_dtype)
        return rms_normalize(x, self.eps) * scale.astype(x.dtype)
