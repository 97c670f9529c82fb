"""Routing and the routed experts against hand-computed cases and a dense reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from l4jax.model.moe import route, routed_experts


def test_router_takes_sigmoid_of_top_k_logits():
    x = jnp.eye(3)
    router = jnp.array([[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, 1.0, -2.0], [-1.0, -2.0, -3.0, -0.5]])
    scores, experts = route(x, router, 2)
    np.testing.assert_array_equal(experts, [[0, 2], [1, 2], [3, 0]])
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(scores, [[sig(2), sig(0.5)], [sig(3), sig(1)], [sig(-0.5), sig(-1)]], rtol=1e-6)


# Assignment counts N k = 2, 26 and 150 over 8 experts (and over a slice of 4): the gathered, the dense and the
# grouped path.
@pytest.mark.parametrize("N", [1, 13, 75])
def test_routed_experts_scale_the_input_and_match_dense_reference(N):
    rng = np.random.default_rng(N)
    D, F, E, k = 6, 5, 8, 2
    x = rng.normal(size=(N, D)).astype(np.float32)
    gate, up = rng.normal(size=(2, E, D, F)).astype(np.float32)
    down = rng.normal(size=(E, F, D)).astype(np.float32)
    scores, experts = route(jnp.asarray(x), jnp.asarray(rng.normal(size=(D, E)), jnp.float32), k)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731

    def reference(first, El):  # expert(score * x), summed over the token's k experts held in [first, first + El)
        out = np.zeros((N, D), np.float32)
        for n in range(N):
            for j in range(k):
                e, xs = int(experts[n, j]), float(scores[n, j]) * x[n]
                if first <= e < first + El:
                    out[n] += (silu(xs @ gate[e]) * (xs @ up[e])) @ down[e]
        return out

    for impl in ("scan", "ragged_dot"):
        got = routed_experts(jnp.asarray(x), scores, experts, gate, up, down, impl=impl)
        np.testing.assert_allclose(got, reference(0, E), rtol=1e-5, atol=1e-5)
    # One device's slice of an expert-parallel layer: experts 4 to 7 only, the other assignments add nothing.
    got = routed_experts(jnp.asarray(x), scores, experts, gate[4:], up[4:], down[4:], first=4)
    np.testing.assert_allclose(got, reference(4, 4), rtol=1e-5, atol=1e-5)
