"""The nested-dict tree helpers against hand-built trees."""

import jax.numpy as jnp
import pytest

from l4jax import tree


def test_get_put_replace_and_count():
    t: dict = {}
    tree.put(t, ("layers_0", "attn", "q"), jnp.zeros((2, 3)))
    tree.put(t, ("layers_0", "attn", "k"), jnp.zeros((2, 1)))
    tree.put(t, ("embed",), jnp.zeros((5, 2)))
    assert tree.get(t, ("layers_0", "attn", "q")).shape == (2, 3)
    assert [p for p, _ in tree.leaves(t)] == [("embed",), ("layers_0", "attn", "k"), ("layers_0", "attn", "q")]
    assert tree.count(t) == 6 + 2 + 10
    new = tree.replace(t, {("layers_0", "attn", "q"): jnp.ones((2, 3))})
    assert float(new["layers_0"]["attn"]["q"].sum()) == 6 and float(t["layers_0"]["attn"]["q"].sum()) == 0
    assert new["embed"] is t["embed"]  # untouched subtrees are shared, not copied
    with pytest.raises(KeyError, match="layers_0/mlp/gate: the params has no 'layers_0/mlp'"):
        tree.get(t, ("layers_0", "mlp", "gate"), "the params")
