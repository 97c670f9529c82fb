"""Routing and the routed experts against hand-computed cases and a dense reference."""

import jax.numpy as jnp
import numpy as np

from l4jax.model.moe import route, routed_experts


def test_router_takes_sigmoid_of_top_k_logits():
    x = jnp.eye(3)
    router = jnp.array([[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, 1.0, -2.0], [-1.0, -2.0, -3.0, -0.5]])
    scores, experts = route(x, router, 2)
    np.testing.assert_array_equal(experts, [[0, 2], [1, 2], [3, 0]])
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(scores, [[sig(2), sig(0.5)], [sig(3), sig(1)], [sig(-0.5), sig(-1)]], rtol=1e-6)


def test_routed_experts_scale_the_input_and_match_dense_reference():
    rng = np.random.default_rng(0)
    N, D, F, E, k = 13, 6, 5, 4, 2
    x = rng.normal(size=(N, D)).astype(np.float32)
    gate, up = rng.normal(size=(2, E, D, F)).astype(np.float32)
    down = rng.normal(size=(E, F, D)).astype(np.float32)
    scores, experts = route(jnp.asarray(x), jnp.asarray(rng.normal(size=(D, E)), jnp.float32), k)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    expect = np.zeros((N, D), np.float32)
    for n in range(N):  # reference semantics: expert(score * x), summed over the token's k experts
        for j in range(k):
            e, xs = int(experts[n, j]), float(scores[n, j]) * x[n]
            expect[n] += (silu(xs @ gate[e]) * (xs @ up[e])) @ down[e]
    for impl in ("scan", "ragged_dot"):
        got = routed_experts(jnp.asarray(x), scores, experts, gate, up, down, impl=impl)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
