"""Mixture of experts: top-k sigmoid router that scales the expert *input*, SwiGLU experts, a shared expert.

Dispatch is sparse and dropless: each token's k (token, expert) assignments are sorted by expert and run through
a grouped matmul (``gmm``), so the work is proportional to tokens x k. No capacity, no token is ever dropped.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh
from .gmm import gmm
from .mlp import INIT, MLP


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x [N, D], router [D, E] -> (scores [N, k] in x.dtype, experts [N, k] int32).

    Top-k on the raw logits, then a sigmoid of the selected logits: no softmax and no renormalisation over the k.
    """
    logits = jnp.einsum("nd,de->ne", x, router)
    top, experts = jax.lax.top_k(logits, k)
    return jax.nn.sigmoid(top.astype(jnp.float32)).astype(x.dtype), experts.astype(jnp.int32)


def routed_experts(x: jax.Array, scores: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array, *, impl: str = "scan") -> jax.Array:
    """Sum over each token's k experts of expert_e(score * x). x [N, D]; gate, up [E, D, F]; down [E, F, D]."""
    N, k = experts.shape
    E = gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignment slots grouped by expert
    sizes = jnp.bincount(flat, length=E)
    # The router score multiplies the expert's input, not its output: expert(s*x) != s*expert(x) for SwiGLU.
    xs = x[order // k] * scores.reshape(-1)[order][:, None]
    g = gmm(xs, gate, sizes, impl=impl)   # "md,edf->mf" per group
    u = gmm(xs, up, sizes, impl=impl)     # "md,edf->mf" per group
    y = gmm(jax.nn.silu(g) * u, down, sizes, impl=impl)  # "mf,efd->md" per group
    y = jnp.zeros_like(y).at[order].set(y)  # back to (token, slot) order
    return y.reshape(N, k, -1).sum(axis=1)


class MoE(nn.Module):
    num_experts: int  # E
    top_k: int
    hidden: int       # F, of each routed expert and of the shared expert
    impl: str = "scan"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        E, F = self.num_experts, self.hidden
        p = lambda name, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(INIT, axes), shape, self.param_dtype).astype(self.dtype)
        router = p("router", (D, E), (sh.EMBED, None))                  # "nd,de->ne"
        gate = p("gate", (E, D, F), (sh.EXPERT, sh.EMBED, sh.EXPERT_MLP))  # "md,edf->mf"
        up = p("up", (E, D, F), (sh.EXPERT, sh.EMBED, sh.EXPERT_MLP))      # "md,edf->mf"
        down = p("down", (E, F, D), (sh.EXPERT, sh.EXPERT_MLP, sh.EMBED))  # "mf,efd->md"
        flat = x.reshape(B * T, D)
        with jax.named_scope("router"):
            scores, experts = route(flat, router, self.top_k)
        with jax.named_scope("experts"):
            routed = routed_experts(flat, scores, experts, gate, up, down, impl=self.impl)
        shared = MLP(F, dtype=self.dtype, param_dtype=self.param_dtype, name="shared")(x)
        return shared + routed.reshape(B, T, D)
