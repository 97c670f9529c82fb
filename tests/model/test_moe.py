"""Routing and the routed experts against hand-computed cases and a dense reference."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import l4jax
from l4jax.model.moe import route, routed_experts
from tiny import batch, hf_model, save


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


def test_expert_load_counts_transformers_router_choices(tmp_path):
    """Model.expert_load (the router heatmaps of the notebooks): per MoE layer, the real tokens routed to each
    expert, equal to the top-k of transformers' router logits counted over the same tokens."""
    hf = hf_model("top2", seed=3)
    model = l4jax.load(save(hf, tmp_path))
    ids, mask, pos = batch()
    logits = {}
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.feed_forward, "router"):  # returns (scores, logits) [B * T, E]
            layer.feed_forward.router.register_forward_hook(lambda m, x, out, i=i: logits.__setitem__(i, out[1]))
    with torch.no_grad():
        hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    cfg = model.config.text
    real = mask.reshape(-1).astype(bool)
    expect = np.stack([np.bincount(torch.topk(logits[i], cfg.num_experts_per_tok, -1).indices.numpy()[real].ravel(),
                                   minlength=cfg.num_local_experts) for i in sorted(logits)])
    load = model.expert_load(ids, mask)
    assert sorted(logits) == list(cfg.moe_layers) and load.shape == (len(cfg.moe_layers), cfg.num_local_experts)
    np.testing.assert_array_equal(load, expect)
    assert (load.sum(1) == mask.sum() * cfg.num_experts_per_tok).all()
