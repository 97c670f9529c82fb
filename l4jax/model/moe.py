"""Mixture of experts: top-k sigmoid router that scales the expert *input*, SwiGLU experts, a shared expert.

Dispatch is sparse and dropless: each token's k (token, expert) assignments are sorted by expert and run through
a grouped matmul (``gmm``), so the work is proportional to tokens x k. No capacity, no token is ever dropped.

With a mesh (``Partitioning.mesh``) the routed experts run in a ``shard_map``: each device holds E/expert experts
(and F/tensor of each expert's hidden width) and computes only the assignments to its own experts; a ``psum`` over
the expert and tensor axes adds the pieces. Tokens are already replicated over those axes (the batch lives on
data/fsdp), so no token is moved and no expert weight is ever gathered across ``expert``. It uses only ``psum``
and ``all_gather`` (the latter for FSDP's model dimension), which XLA:CPU has, and it is exact: every
(token, slot) result comes from exactly one device, and the others add zeros.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .axes import ACT_EMBED, BATCH, EMBED, EXPERT, EXPERT_MLP, LENGTH, Partitioning, ShardingError, mesh_axes
from .gmm import gmm
from .layers import MLP, param, project
from .quant import QArray, matmul, weight, with_scales


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


# Up to this many (token, expert) assignments, one dense pass over the experts does no more work than the grouped
# matmul (whose tile shrinks to the assignment count, so it visits every expert with all of them anyway) and runs as
# one batched matmul instead of a loop over experts: decode-sized batches.
DENSE_ROWS = 128


def routed_experts(x: jax.Array, scores: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array, *, impl: str = "scan", first: jax.Array | int = 0) -> jax.Array:
    """Sum over each token's k experts of expert_e(score * x), counting only experts first ... first + El - 1.

    x [N, D]; scores, experts [N, k]; gate, up [El, D, F]; down [El, F, D] -> [N, D]. With ``first`` = 0 and all
    E experts this is the whole layer; a device of an expert-parallel mesh passes its own slice (assignments to
    other devices' experts contribute zeros). The path follows the assignment count M = N k, static: fewer than El
    gathers the chosen experts' weights (each assignment reads its own expert: fewer bytes than reading all El),
    up to ``DENSE_ROWS`` runs every assignment through every local expert in one pass (each expert read once), and
    more go through the sparse grouped matmul (training, prefill).
    """
    N, k = experts.shape
    El = gate.shape[0]
    slot = experts.reshape(-1) - first                     # [N k] local expert id, or out of range
    ok = (slot >= 0) & (slot < El)
    # The router score multiplies the expert's input, not its output: expert(s*x) != s*expert(x) for SwiGLU.
    xs = jnp.repeat(x, k, axis=0) * scores.reshape(-1)[:, None]
    if N * k < El:
        y = _gathered(xs, jnp.where(ok, slot, 0), gate, up, down)
    elif N * k <= DENSE_ROWS:
        y = _dense(xs, jnp.where(ok, slot, 0), gate, up, down)
    else:
        y = _grouped(xs, jnp.where(ok, slot, El), gate, up, down, impl)
    return jnp.where(ok[:, None], y, 0).reshape(N, k, -1).sum(axis=1)


def _gathered(xs: jax.Array, e: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """xs [M, D] through expert e[m] each, reading only those experts' weights."""
    if isinstance(gate, QArray):  # the chosen experts' values go into the dots as they are, scaled after
        gate, up, down = (w.at(e) for w in (gate, up, down))
        h = jax.nn.silu(matmul("md,mdf->mf", xs, gate)) * matmul("md,mdf->mf", xs, up)
        return matmul("mf,mfd->md", h.astype(xs.dtype), down).astype(xs.dtype)
    f32 = dict(preferred_element_type=jnp.float32)  # fp32 products keep XLA from rewriting a one-row product
    gate, up, down = gate[e], up[e], down[e]
    h = jax.nn.silu(jnp.einsum("md,mdf->mf", xs, gate, **f32)) * jnp.einsum("md,mdf->mf", xs, up, **f32)
    return jnp.einsum("mf,mfd->md", h.astype(xs.dtype), down, **f32).astype(xs.dtype)


def _dense(xs: jax.Array, e: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """xs [M, D] through every expert (each weight read once), keeping expert e[m]'s output of row m."""
    # One batched matmul per weight, the expert axis as its batch axis: the weights are read in their stored layout
    # (a "md,edf->mef" contraction makes XLA transpose every expert matrix first, each step).
    gate, up, down = (weight(w, xs.dtype) for w in (gate, up, down))  # every expert is read anyway
    xe = jnp.broadcast_to(xs, (gate.shape[0],) + xs.shape)                        # [E, M, D]
    h = jax.nn.silu(project("emd,edf->emf", xe, gate)) * project("emd,edf->emf", xe, up)
    h = h * jax.nn.one_hot(e, gate.shape[0], dtype=h.dtype).T[:, :, None]  # only the chosen expert goes on
    return project("emf,efd->md", h, down)


def _grouped(xs: jax.Array, key: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
             impl: str) -> jax.Array:
    """xs [M, D] sorted by expert ``key`` (El = elsewhere, sorted last and left at zero) through the grouped matmul."""
    El = gate.shape[0]
    order = jnp.argsort(key, stable=True)                  # assignment slots grouped by expert
    sizes = jnp.bincount(key, length=El + 1)[:El]          # gmm leaves rows past sum(sizes) at zero
    xs = xs[order]
    g = gmm(xs, gate, sizes, impl=impl)                    # "md,edf->mf" per group
    u = gmm(xs, up, sizes, impl=impl)                      # "md,edf->mf" per group
    y = gmm(jax.nn.silu(g) * u, down, sizes, impl=impl)    # "mf,efd->md" per group
    return jnp.zeros_like(y).at[order].set(y)              # back to (token, slot) order


def _mesh_axes(entry, mesh) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axes, leaving out size-1 axes (no-op collectives would only
    clutter the program)."""
    return tuple(a for a in mesh_axes(entry) if mesh.shape[a] > 1)


def routed_experts_sharded(x: jax.Array, scores: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array,
                           down: jax.Array, part: Partitioning, *, impl: str = "scan") -> jax.Array:
    """``routed_experts`` on ``part``'s mesh, expert-parallel and tensor-parallel. Same numbers.

    x [B, T, D], scores/experts [B, T, k]; gate, up [E, D, F]; down [E, F, D]. Shardings come from ``part``'s
    rules: tokens on BATCH, weights on (EXPERT, EMBED, EXPERT_MLP). Per device: El = E/expert experts,
    Fl = F/tensor hidden columns, b = B/(data*fsdp) rows.
    """
    mesh = part.mesh
    w_in, w_out = part.spec((EXPERT, EMBED, EXPERT_MLP)), part.spec((EXPERT, EXPERT_MLP, EMBED))
    ex, embed, mlp = (_mesh_axes(e, mesh) for e in tuple(w_in) + (None,) * (3 - len(w_in)))
    n_ex = part.axis_size(ex)
    if gate.shape[0] % n_ex:
        raise ShardingError(f"expert: {gate.shape[0]} experts are not divisible by mesh axes {ex} "
                                  f"(size {n_ex})")

    whole = (gate, up, down)

    def local(x, scores, experts, gate, up, down):
        # FSDP: weights arrive with the model dimension split; gather it back (this layer's local experts only).
        if embed:
            gate, up, down = (_all_gather(w, embed, a, of) for w, a, of in zip((gate, up, down), (1, 1, 2), whole))
        b, T, D = x.shape
        first = jax.lax.axis_index(ex) * gate.shape[0] if ex else 0
        y = routed_experts(x.reshape(b * T, D), scores.reshape(b * T, -1), experts.reshape(b * T, -1), gate, up,
                           down, impl=impl, first=first).reshape(b, T, D)  # partial over the Fl slice
        return jax.lax.psum(y, ex + mlp) if ex + mlp else y

    # Tokens stay where they are: rows over the batch axes and, for a long-context mesh, positions over the
    # sequence's (each token is routed on its own); a decode step's one token is on every device of those.
    spec = part.sharding((BATCH, LENGTH, ACT_EMBED), x.shape).spec
    tspec = P(*(tuple(spec) + (None,) * 3)[:2], None)
    # check_vma=False: gmm's scan carries start as (device-invariant) zeros while its updates vary per device,
    # which the varying-axes checker rejects; the psum above is what makes the result replicated.
    specs = (tspec, tspec, tspec, with_scales(gate, w_in), with_scales(up, w_in), with_scales(down, w_out))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tspec, check_vma=False)(
        x, scores, experts, gate, up, down)


def _all_gather(w: jax.Array | QArray, axes: tuple[str, ...], axis: int, whole) -> jax.Array | QArray:
    """The whole of w's ``axis`` from its shards over mesh ``axes``; a QArray's scales too where they are split
    (``whole``, the weight outside the shard_map, says: one scale per output channel is never split along an input
    axis)."""
    if not isinstance(w, QArray):
        return jax.lax.all_gather(w, axes, axis=axis, tiled=True)
    axis = w.axis(axis)  # where it is in the values (their layout)
    split = whole.scales.shape[axis] > 1
    scales = jax.lax.all_gather(w.scales, axes, axis=axis, tiled=True) if split else w.scales
    return dataclasses.replace(w, values=jax.lax.all_gather(w.values, axes, axis=axis, tiled=True), scales=scales)


class MoE(nn.Module):
    num_experts: int  # E
    top_k: int
    hidden: int       # F, of each routed expert and of the shared expert
    part: Partitioning = Partitioning()
    impl: str = "scan"
    aux_loss: bool = False  # sow router load-balancing and z-loss terms into the "aux" collection
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        E, F, k = self.num_experts, self.hidden, self.top_k
        router = param(self, "router", (D, E), (EMBED, None))                  # "nd,de->ne"
        # Quantized experts stay quantized here: each path dequantizes only the experts it reads.
        gate = param(self, "gate", (E, D, F), (EXPERT, EMBED, EXPERT_MLP), quantized=True)  # "md,edf->mf"
        up = param(self, "up", (E, D, F), (EXPERT, EMBED, EXPERT_MLP), quantized=True)      # "md,edf->mf"
        down = param(self, "down", (E, F, D), (EXPERT, EXPERT_MLP, EMBED), quantized=True)  # "mf,efd->md"
        flat = x.reshape(B * T, D)
        with jax.named_scope("router"):
            scores, experts = route(flat, router, k)
            self.sow("intermediates", "experts", experts.reshape(B, T, k))  # kept only when asked for (expert_load)
            if self.aux_loss:
                lb, z = router_losses(jnp.einsum("nd,de->ne", flat, router), experts)
                self.sow("aux", "load_balance", lb)
                self.sow("aux", "z_loss", z)
        with jax.named_scope("experts"):
            if self.part.mesh is None:  # one device: plain sparse dispatch
                routed = routed_experts(flat, scores, experts, gate, up, down, impl=self.impl).reshape(B, T, D)
            else:
                routed = routed_experts_sharded(x, scores.reshape(B, T, k), experts.reshape(B, T, k), gate, up, down,
                                                self.part, impl=self.impl)
        shared = MLP(F, self.part, self.dtype, self.param_dtype, name="shared")(x)
        return shared + routed
