"""Context parallelism (l4jax/model/context.py): a sequence split over the ``context`` mesh axis gives the numbers of
one device, for logits, training steps and generation, on configs whose chunk (8) is shorter than a shard, as long
as one, and longer; with left padding and packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l4jax
from l4jax.model import context
from l4jax.model.axes import ShardingError
from l4jax.train.step import Trainer
from tiny import CONFIGS, batch, run_steps, tiny_setup

LENGTHS = (32, 27, 9, 30, 32, 12, 31, 20)  # left padding in most rows


def config(name: str):
    return l4jax.load_config(dict(CONFIGS[name], model_type="llama4_text"))


@pytest.fixture(autouse=True)
def ring(monkeypatch):
    """The tiny rows here are short enough to be gathered whole (``context.GATHER_BYTES``): these tests take the ring
    unless they ask for the gathered path (``gathered``)."""
    monkeypatch.setattr(context, "GATHER_BYTES", 0)


def gathered(monkeypatch):
    monkeypatch.setattr(context, "GATHER_BYTES", 1 << 40)


# Shards of 16 and 8 tokens take the halo path on chunked layers (chunk 8), shards of 4 the gathered one.
MESHES = [dict(context=2, data=4), dict(context=4, data=2), dict(context=8), dict(context=2, expert=2, tensor=2),
          dict(context=4, tensor=2), dict(context=2, fsdp=2, expert=2)]


@pytest.mark.parametrize("name,meshes", [("scout", [MESHES[3]]),  # the halo with expert and tensor (the ring: below)
                                         ("scout gathered", [MESHES[4]]),
                                         pytest.param("scout", MESHES, marks=pytest.mark.slow),
                                         pytest.param("maverick", MESHES[1:2], marks=pytest.mark.slow)])
def test_logits_on_context_meshes_equal_one_device(name, meshes, monkeypatch):
    if name.endswith(" gathered"):  # the global layers' keys gathered whole instead of the ring
        name = name.split()[0]
        gathered(monkeypatch)
    cfg = config(name)
    ids, mask, _ = batch(lengths=LENGTHS)
    want = np.asarray(l4jax.init(cfg, seed=1)(ids, mask))
    for axes in meshes:
        got = np.asarray(l4jax.init(cfg, seed=1, mesh=l4jax.make_mesh(**axes))(ids, mask))
        np.testing.assert_allclose(got[mask > 0], want[mask > 0], rtol=0, atol=2e-6, err_msg=str(axes))


@pytest.mark.parametrize("span,T,gather", [(None, 48, False), (6, 48, False), (16, 48, False), (None, 44, False),
                                           (None, 48, True), (16, 44, True)])
def test_ring_and_halo_attention_equal_dense_attention_in_blocks(span, T, gather, monkeypatch):
    """attend_split on context=4 with blocks of 4 queries and keys (shards of 12: three blocks per ring step, the
    halo path for span 6, the zig-zag ring for a global layer and for span 16; shards of 11: the contiguous ring;
    or the row's keys gathered whole), two documents in one row, left padding: the dense ``attend`` of the row."""
    if gather:
        gathered(monkeypatch)
    from l4jax.model.attention import attend
    from l4jax.model.context import attend_split
    from l4jax.model.masks import visible
    from l4jax.parallel import partitioning
    rng = np.random.default_rng(0)
    B, H, K, hd = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, hd)), jnp.float32) for n in (H, K, K))
    index = jnp.arange(T)[None]
    valid = jnp.asarray(np.arange(T)[None] >= np.array([[5], [0]]))          # row 0 left-padded by 5
    doc = jnp.asarray(np.where(np.arange(T) < 30, 1, 2)[None].repeat(B, 0))  # two documents per row
    group = doc * 100 + (index // span if span else 0)
    want = attend(q, k, v, visible(index, index, valid, group, group), 0.3)
    part = partitioning(config("scout").text, l4jax.make_mesh(context=4, data=2))
    got = jax.jit(lambda *a: attend_split(*a, 0.3, span, part, 4))(q, k, v, index, valid, group)
    keep = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], rtol=0, atol=2e-6)


def test_a_sequence_that_does_not_split_names_the_axis_and_length():
    from l4jax.infer.load import abstract_model
    from l4jax.infer.model import Model
    cfg = config("scout")  # the weights' shapes are enough: the check comes before any work
    model = Model(cfg, abstract_model(cfg), mesh=l4jax.make_mesh(context=4, data=2))
    ids, mask, _ = batch(lengths=(30, 27, 9, 30, 12, 30, 30, 20))
    with pytest.raises(ShardingError, match=r"a sequence of 30 tokens does not split over mesh axes \('context',\) "
                                            r"\(size 4\)"):
        model(ids, mask)


@pytest.mark.slow  # two generate compiles
def test_generation_after_a_context_parallel_prefill(tmp_path):
    """Greedy tokens equal one device's; the prompt (30 tokens) is left-padded to split over context=4; each device
    holds a quarter of the global layers' cache (the chunked layers' ring of 8 whole)."""
    cfg = config("scout")
    ids, mask, _ = batch(lengths=(30, 27, 9, 30, 12, 30, 30, 20))
    want = l4jax.init(cfg, seed=1).generate(ids, mask, max_new_tokens=6)
    model = l4jax.init(cfg, seed=1, mesh=l4jax.make_mesh(context=4, data=2))
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=6), want)
    from l4jax.model.cache import KVCache
    cache = KVCache.init(cfg.text, 8, 64, part=model.part)
    assert cache.k[3].sharding.shard_shape(cache.k[3].shape) == (4, 2, 16, 16)  # global layer: 64 / 4 slots
    assert cache.k[0].sharding.shard_shape(cache.k[0].shape) == (4, 2, 8, 16)   # chunked layer: the whole ring


@pytest.mark.slow  # train-step compiles on four meshes
def test_training_steps_on_context_meshes_equal_one_device(monkeypatch):
    """Packed documents (two per row) on the tiny preset: losses and weights after three steps, through the ring
    on three meshes and through the gathered keys on one."""
    cfg, tc, rows = tiny_setup(eps=1e-3)
    ref_losses, ref_params = run_steps(Trainer(cfg, tc), rows, n=3)
    for axes in (dict(context=4, data=2), dict(context=2, expert=2, tensor=2), dict(context=8), "gathered"):
        if axes == "gathered":
            gathered(monkeypatch)
            axes = dict(context=4, tensor=2)
        losses, params = run_steps(Trainer(cfg, tc, l4jax.make_mesh(**axes)), rows, n=3)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(axes))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=str(axes))
