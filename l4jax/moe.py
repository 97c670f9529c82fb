"""Mixture of experts: top-k sigmoid router that scales the expert *input*, SwiGLU experts, a shared expert.

Dispatch is sparse and dropless: each token's k (token, expert) assignments are sorted by expert and run through
a grouped matmul (``gmm``), so the work is proportional to tokens x k. No capacity, no token is ever dropped.

Under a mesh (``jax.set_mesh``) the routed experts run in ``routed_experts_sharded``: a ``shard_map`` in which each
device holds E/expert experts (and F/tensor of each expert's hidden width) and computes only the assignments to
its own experts; a ``psum`` over the expert and tensor axes adds the pieces. Tokens are already replicated over
those axes (the batch lives on data/fsdp), so no token is moved and no expert weight is ever gathered across
``expert``. It uses only ``psum`` and ``all_gather`` (the latter for FSDP's model dimension), which XLA:CPU has,
and it is exact: every (token, slot) result comes from exactly one device, and the others add zeros.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

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


def router_losses(logits: jax.Array, experts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Optional training terms (the reference trains without them). logits [N, E], experts [N, k] -> scalars.

    load balance = E * sum_e f_e * P_e (Switch Transformer): f_e the fraction of the N*k assignments routed to e
    (no gradient), P_e the mean softmax probability of e; minimal (1) when both are uniform. The softmax stands in
    for the sigmoid scores because it ties the experts together, so lowering an overloaded expert's logit helps.
    z = mean_n logsumexp(logits_n)^2 (ST-MoE) keeps router logits small.
    """
    E = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    f = jnp.bincount(experts.reshape(-1), length=E) / experts.size
    P = jax.nn.softmax(logits, axis=-1).mean(axis=0)
    return E * jnp.sum(f * P), jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


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


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, a mesh axis or a tuple of them) as a tuple of mesh axes."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def routed_experts_sharded(x: jax.Array, scores: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array,
                           down: jax.Array, *, impl: str = "scan") -> jax.Array:
    """``routed_experts`` on the mesh in context, expert-parallel and tensor-parallel. Same shapes, same numbers.

    x [B, T, D], scores/experts [B, T, k]; gate, up [E, D, F]; down [E, F, D]. Shardings come from the logical
    axis rules in context (never named here): tokens on BATCH, weights on (EXPERT, EMBED, EXPERT_MLP).
    Per device: El = E/expert experts, Fl = F/tensor hidden columns, b = B/(data*fsdp) rows.
    """
    mesh = jax.sharding.get_abstract_mesh()
    tok = nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    w_in = nn.logical_to_mesh_axes((sh.EXPERT, sh.EMBED, sh.EXPERT_MLP))
    w_out = nn.logical_to_mesh_axes((sh.EXPERT, sh.EXPERT_MLP, sh.EMBED))
    # Size-1 axes are left out: no-op collectives would only clutter the program.
    ex, embed, mlp = ([a for a in _axes(e) if mesh.shape[a] > 1] for e in w_in)
    ex, embed, mlp = tuple(ex), tuple(embed), tuple(mlp)
    E, k = gate.shape[0], experts.shape[-1]
    n_ex = 1
    for a in ex:
        n_ex *= mesh.shape[a]
    if E % n_ex:
        raise sh.ShardingError(f"expert: {E} experts are not divisible by mesh axes {ex} (size {n_ex})")

    def local(x, scores, experts, gate, up, down):
        # FSDP: weights arrive with the model dimension split; gather it back (this layer's local experts only).
        if embed:
            gate = jax.lax.all_gather(gate, embed, axis=1, tiled=True)
            up = jax.lax.all_gather(up, embed, axis=1, tiled=True)
            down = jax.lax.all_gather(down, embed, axis=2, tiled=True)
        b, T, D = x.shape
        El = gate.shape[0]
        first = jax.lax.axis_index(ex) * El if ex else 0
        slot = experts.reshape(-1) - first                       # [b*T*k] local expert id, or out of range
        key = jnp.where((slot >= 0) & (slot < El), slot, El)     # other devices' assignments sort past the end
        order = jnp.argsort(key, stable=True)
        sizes = jnp.bincount(key, length=El + 1)[:El]            # gmm leaves rows past sum(sizes) at zero
        flat = x.reshape(b * T, D)
        xs = flat[order // k] * scores.reshape(-1)[order][:, None]
        g = gmm(xs, gate, sizes, impl=impl)                      # [b*T*k, Fl]
        u = gmm(xs, up, sizes, impl=impl)
        y = gmm(jax.nn.silu(g) * u, down, sizes, impl=impl)      # [b*T*k, D], partial over the Fl slice
        y = jnp.zeros_like(y).at[order].set(y).reshape(b, T, k, D).sum(axis=2)
        return jax.lax.psum(y, ex + mlp) if ex + mlp else y

    tspec = P(tok[0], None, None)
    # check_vma=False: gmm's scan carries start as (device-invariant) zeros while its updates vary per device,
    # which the varying-axes checker rejects; the psum above is what makes the result replicated.
    return jax.shard_map(local, in_specs=(tspec, tspec, tspec, P(*w_in), P(*w_in), P(*w_out)),
                         out_specs=tspec, check_vma=False)(x, scores, experts, gate, up, down)


class MoE(nn.Module):
    num_experts: int  # E
    top_k: int
    hidden: int       # F, of each routed expert and of the shared expert
    impl: str = "scan"
    aux_loss: bool = False  # sow router load-balancing and z-loss terms into the "aux" collection
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
            if self.aux_loss:
                lb, z = router_losses(jnp.einsum("nd,de->ne", flat, router), experts)
                self.sow("aux", "load_balance", lb)
                self.sow("aux", "z_loss", z)
        with jax.named_scope("experts"):
            if jax.sharding.get_abstract_mesh().empty:  # one device (or no mesh set): plain sparse dispatch
                routed = routed_experts(flat, scores, experts, gate, up, down, impl=self.impl).reshape(B, T, D)
            else:
                kk = self.top_k
                routed = routed_experts_sharded(x, scores.reshape(B, T, kk), experts.reshape(B, T, kk), gate, up,
                                                down, impl=self.impl)
        shared = MLP(F, dtype=self.dtype, param_dtype=self.param_dtype, name="shared")(x)
        return shared + routed
