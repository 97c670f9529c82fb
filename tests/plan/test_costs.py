"""The plan's figures against hand counts on the tiny config: parameter counts, the FLOPs of one layer, the bytes
a decode step must read, and the roofline bound."""

import dataclasses

import pytest

import l4jax
from l4jax import tree
from l4jax.infer.load import abstract_model
from l4jax.plan import costs
from l4jax.plan.targets import CHIPS
from l4jax.train import flops


@pytest.fixture(scope="module")
def tiny():
    return l4jax.load_config("tiny").text


def test_weights_match_the_model_parameter_tree(tiny):
    for name in ("tiny", "maverick"):
        config = l4jax.load_config(name)
        w = costs.weights(config.text)
        assert w.total == tree.count(abstract_model(dataclasses.replace(config, vision=None)))
    # tiny by hand: V 512, D 128, 4 layers of 4 q / 2 kv heads x 32, dense layers 0, 2 (Fm 256), MoE 1, 3 (4 x 128)
    w = costs.weights(tiny)
    attention = 128 * 32 * (2 * 4 + 2 * 2)
    assert w.embed == 512 * 128 and w.per_expert == 3 * 128 * 128 and w.moe_layers == 2
    assert w.dense == 512 * 128 + 128 + 4 * (2 * 128 + attention) + 2 * 3 * 128 * 256 + 2 * (128 * 4 + 3 * 128 * 128)


def test_flops_of_one_layer_by_hand(tiny):
    """One dense global layer's forward FLOPs per token: 2 x (q, k, v, o) + 2 x (scores, probs @ v) over the keys it
    sees + 2 x 3 matmuls of the MLP; the difference between two contexts is the attention term alone."""
    one = dataclasses.replace(tiny, num_hidden_layers=1, moe_layers=(), rope_layers=(False,),
                              chunked_layers=(False,))
    D, hd, H, K, F, V = 128, 32, 4, 2, 256, 512
    for context in (0, 99):
        want = 2 * D * V + 2 * D * hd * (2 * H + 2 * K) + 2 * 2 * H * hd * (context + 1) + 2 * 3 * D * F
        assert flops.decode_flops_per_token(one, context) == want
    T = 64  # causal: the average query sees (T + 1) / 2 keys
    assert flops.forward_flops_per_token(one, T) == 2 * D * V + 2 * D * hd * (2 * H + 2 * K) + 2 * 2 * H * hd * (
        T + 1) / 2 + 2 * 3 * D * F


def test_decode_bytes_and_bound_by_hand(tiny):
    """Batch 1 reads the always-used weights, one routed expert per MoE layer (top-1) and the whole cache: chunked
    layers a ring of 64 slots (the chunk), the global layer (3) all 100."""
    c = costs.decode_costs(tiny, batch=1, cache=100, itemsize=2, devices=1)
    w = costs.weights(tiny)
    kv = 2 * 2 * 32 * 2  # k and v, 2 kv heads x 32, bf16, per slot
    assert costs.cache_bytes(tiny, 1, 100, 2) == kv * (3 * 64 + 100)
    assert c.bytes == (w.dense + 1 * w.per_expert * 2) * 2 + kv * (3 * 64 + 100)
    assert costs.experts_touched(tiny, 1) == pytest.approx(1) and costs.experts_touched(tiny, 10**6) == pytest.approx(4)
    seconds, by = dataclasses.replace(c, devices=8).bound_seconds(CHIPS["h100"])
    assert by == "memory" and seconds == pytest.approx(c.bytes / (8 * 3.35e12))
    assert c.bound_seconds(CHIPS["cpu"])[0] is None
