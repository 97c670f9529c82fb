"""The building blocks every module shares: the one parameter helper, RMSNorm (and the weightless QK-norm), SwiGLU.

``param`` is the only way a module declares a weight: it attaches the logical axis names (for sharding), draws
from the initialiser in ``param_dtype`` and returns the value cast to the compute dtype. The einsum that uses a
weight is written beside its declaration, so a reader sees the shape, the axes and the contraction together.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .axes import ACT_MLP, BATCH, EMBED, LENGTH, MLP as MLP_AXIS, NORM, Partitioning
from .quant import FUSED_ROWS, QArray, matmul, weight

INIT = nn.initializers.normal(0.02)


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
          init: Callable = INIT, dtype=None, quantized: bool = False) -> jax.Array | QArray:
    """Declare ``module``'s parameter ``name`` [shape] on logical ``axes``, stored in ``module.param_dtype``,
    returned cast to ``dtype`` (default ``module.dtype``, the compute dtype). A weight stored quantized
    (``quant.QArray``) is returned dequantized, or as it is with ``quantized=True`` (for a caller that
    dequantizes only the part it reads: the MoE's experts)."""
    if module.has_variable("params", name) and isinstance(w := module.get_variable("params", name), QArray):
        # Read as it is: flax's own shape check would compare the values, which may be kept transposed (``layout``).
        if w.shape != tuple(shape):
            raise ValueError(f"{module.name}/{name}: a quantized weight of shape {w.shape}, expected {tuple(shape)}")
        return w if quantized else w.dequantize(module.dtype if dtype is None else dtype)
    w = module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), module.param_dtype)
    return weight(w, module.dtype if dtype is None else dtype)


def project(eq: str, x: jax.Array, w: jax.Array | QArray) -> jax.Array:
    """``jnp.einsum(eq, x, w)`` for x whose first axis holds rows (tokens) sharing the weight w: accumulated in fp32
    and rounded once to x's dtype (what a bf16 GEMM does), w read once however few rows there are.

    A single row (a batch-1 decode step) is padded to two and cut back: XLA rewrites a one-row product as multiply
    + reduce and, where the reduction does not fuse with its multiply (or two such products share x: q, k and v;
    gate and up), writes the weight-sized products out for the reduction to read back, two or three passes over
    the weights instead of one (seen in the program compiled for an H100).
    """
    rows = math.prod(x.shape[:-1]) if eq.startswith("...") else x.shape[0] * math.prod(x.shape[1:-1])
    if rows == 1:
        return project(eq, jnp.concatenate([x, jnp.zeros_like(x)]), w)[:1]
    if isinstance(w, QArray):  # a quantized weight: multiplied as it is for a few rows, else dequantized once
        if rows <= FUSED_ROWS:
            return matmul(eq, x, w).astype(x.dtype)
        w = w.dequantize(x.dtype)
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


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
        scale = param(self, "scale", (x.shape[-1],), (NORM,), nn.initializers.ones, dtype=x.dtype)
        return rms_normalize(x, self.eps) * scale


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
           part: Partitioning = Partitioning()) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)). x [..., D]; gate, up [D, F]; down [F, D]."""
    g = project("...d,df->...f", x, gate)
    u = project("...d,df->...f", x, up)
    h = part.constrain(jax.nn.silu(g) * u, (BATCH, LENGTH, ACT_MLP)[-x.ndim:])
    return project("...f,fd->...d", h, down)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the MoE's shared expert."""

    hidden: int  # F
    part: Partitioning = Partitioning()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F = x.shape[-1], self.hidden
        # A quantized weight reaches project as it is (quant.matmul for few rows).
        gate = param(self, "gate", (D, F), (EMBED, MLP_AXIS), quantized=True)  # "...d,df->...f"
        up = param(self, "up", (D, F), (EMBED, MLP_AXIS), quantized=True)      # "...d,df->...f"
        down = param(self, "down", (F, D), (MLP_AXIS, EMBED), quantized=True)  # "...f,fd->...d"
        return swiglu(x, gate, up, down, self.part)
