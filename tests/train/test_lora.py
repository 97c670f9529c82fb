"""LoRA: config checks, init, merge against numpy on both parameter layouts, sharding names, a training step that
moves only the adapters, save/load, and the errors."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import yaml

import l4jax
from l4jax import tree
from l4jax.config import PRESET_DIR
from l4jax.model import Inputs, Llama4Text
from l4jax.model.decoder import abstract_params
from l4jax.parallel import partitioning
from l4jax.train import lora, lora_files
from l4jax.train.lora import LoraConfig, LoraError

ALL = LoraConfig(rank=4, alpha=8.0, experts=True)  # every kind of adapter; scale 2


def random_model(layers: int) -> l4jax.Model:
    """The tiny config cut to ``layers`` layers, weights drawn in numpy: the model is only traced (eval_shape),
    never compiled, to initialise it."""
    config = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    config = l4jax.load_config(dict(config, num_hidden_layers=layers))
    rng = np.random.default_rng(3)

    def draw(path, x):  # norms at 1, the rest normal(0, 0.02) as l4jax.init
        return np.ones(x.shape, np.float32) if path[-1].key == "scale" else rng.normal(0, 0.02, x.shape)
    params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(Llama4Text(config.text))))
    return l4jax.Model(config, jax.tree.map(lambda x: jnp.asarray(x.astype(np.float32)), params))


@pytest.fixture(scope="module")
def model():
    """Four layers: dense, MoE, dense, MoE (enough for a stacked layout of two blocks)."""
    return random_model(4)


@pytest.fixture(scope="module")
def small():
    """Two layers, dense then MoE: every kind of adapter, at half the compile time of a forward."""
    return random_model(2)


def _stack(a, b):  # in numpy: eager jnp.stack would compile once per leaf shape
    return jnp.asarray(np.stack([np.asarray(a), np.asarray(b)]))


def stacked(params, combine=_stack, is_leaf=None):
    """The scanned layout with period 2: blocks/layers_0 = layers 0 and 2 (dense), blocks/layers_1 = 1 and 3 (MoE).

    ``combine`` joins the two layers' leaves (stacks arrays; for axis names, prepends the leading axis's name)."""
    def stack(i, j):
        return jax.tree.map(combine, params[f"layers_{i}"], params[f"layers_{j}"], is_leaf=is_leaf)
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "blocks": {"layers_0": stack(0, 2), "layers_1": stack(1, 3)}}


def randomised(adapters, seed=0):
    """The same adapters with B (and A) drawn at random, so that merge actually changes something."""
    rng = np.random.default_rng(seed)  # numpy, not jax.random: no generator to compile per shape
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape).astype(x.dtype)), adapters)


def walk(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def paths(tree):
    return {"/".join(k.key for k in ks) for ks, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -------------------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank: must be an integer >= 1, got 0"),
    ({"rank": 2.0}, "rank: must be an integer >= 1"),
    ({"alpha": float("nan")}, "alpha: must be a finite number > 0"),
    ({"targets": ("q", "gate")}, "unknown ['gate']; allowed: ['q', 'k', 'v', 'o']"),
    ({"targets": "q"}, "got the string 'q'"),
    ({"targets": ("q", "q")}, "duplicates"),
    ({"targets": ()}, "nothing to adapt"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(LoraError, match="LoraConfig") as e:
        LoraConfig(**kwargs)
    assert message in str(e.value)


def test_config_round_trip_and_scale():
    cfg = LoraConfig(rank=16, alpha=8.0, targets=["q", "v"], experts=True)  # a list, as JSON gives it back
    assert cfg.targets == ("q", "v") and cfg.scale == 0.5
    assert LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LoraConfig(targets=(), experts=True).adapts("moe", "down")
    assert not LoraConfig().adapts("moe", "gate") and not ALL.adapts("shared", "gate")
    with pytest.raises(LoraError, match=r"unknown fields \['dropout'\]"):
        LoraConfig.from_dict({"rank": 2, "dropout": 0.1})


# ----------------------------------------------------------------------------------------------------------- init

def test_init_adapts_only_targets_with_zero_b(model):
    ad = lora.init(model.params, ALL, jax.random.key(0))
    attn = {f"layers_{i}/attn/{w}/{f}" for i in range(4) for w in "qkvo" for f in "ab"}
    experts = {f"layers_{i}/moe/{w}/{f}" for i in (1, 3) for w in ("gate", "up", "down") for f in "ab"}
    assert paths(ad) == attn | experts  # never the dense MLP nor the shared expert, which reuse the leaf names
    shapes = {k: (v["a"].shape, v["b"].shape) for k, v in ad["layers_1"]["attn"].items()}
    assert shapes == {"q": ((128, 4), (4, 4, 32)), "k": ((128, 4), (4, 2, 32)), "v": ((128, 4), (4, 2, 32)),
                      "o": ((4, 32, 4), (4, 128))}
    assert ad["layers_3"]["moe"]["gate"]["a"].shape == (4, 128, 4)
    assert ad["layers_3"]["moe"]["down"]["b"].shape == (4, 4, 128)
    assert all(np.abs(ab["b"]).max() == 0.0 for _, ab in lora.adapters(ad))
    assert {x.dtype for x in jax.tree.leaves(ad)} == {jnp.dtype("float32")}
    # Per layer q 128*4 + 4*4*32, k and v 128*4 + 4*2*32, o 4*32*4 + 4*128; per MoE layer 3 x (2 x 4*128*4).
    assert tree.count(ad) == 4 * (1024 + 768 + 768 + 1024) + 2 * 3 * 4096 == 38912
    only_qv = lora.init(model.params, LoraConfig(rank=4, targets=("q", "v")), jax.random.key(0))
    assert paths(only_qv) == {f"layers_{i}/attn/{w}/{f}" for i in range(4) for w in "qv" for f in "ab"}


def test_init_std_is_one_over_sqrt_fan_in():
    # Shapes only (ShapeDtypeStructs). The fan-in is D = 512 for q, H*hd = 128 for o (not D) and F = 128 for an
    # expert's down (not E*F): A's std must follow it.
    sds = jax.ShapeDtypeStruct
    params = {"layers_0": {"attn": {"q": sds((512, 4, 16), jnp.bfloat16), "o": sds((4, 32, 512), jnp.bfloat16)},
                           "moe": {"down": sds((4, 128, 512), jnp.bfloat16)}}}
    ad = lora.init(params, LoraConfig(rank=4, targets=("q", "o"), experts=True), jax.random.key(1))
    a = {k: np.asarray(ab["a"]) for k, ab in (("q", ad["layers_0"]["attn"]["q"]), ("o", ad["layers_0"]["attn"]["o"]),
                                                ("down", ad["layers_0"]["moe"]["down"]))}
    assert {k: v.shape for k, v in a.items()} == {"q": (512, 4), "o": (4, 32, 4), "down": (4, 128, 4)}
    for name, fan_in in (("q", 512), ("o", 128), ("down", 128)):  # 2048, 512 and 2048 samples
        assert abs(np.std(a[name]) * np.sqrt(fan_in) - 1) < 0.12, name
        assert abs(np.mean(a[name]) * np.sqrt(fan_in)) < 0.2, name
    # Distinct random draws per weight, not one key reused.
    assert np.abs(a["q"] - a["down"].reshape(512, 4) * 2).max() > 0.1


# ---------------------------------------------------------------------------------------------------------- merge

@pytest.mark.parametrize("layout", ["unstacked", "stacked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_b_merge_is_bit_exact(model, layout, dtype):
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(jnp.dtype(dtype))), model.params)
    params = stacked(params) if layout == "stacked" else params
    merged = lora.merge(params, lora.init(params, ALL, jax.random.key(0)), ALL)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for (path, m), p in zip(jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(params)):
        assert m.dtype == p.dtype, path
        np.testing.assert_array_equal(np.asarray(m, np.float32), np.asarray(p, np.float32), err_msg=str(path))


def test_zero_b_logits_are_bit_exact(small):
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) * 7 % 512
    forward = jax.jit(lambda p: small.module.apply({"params": p}, Inputs(ids)).logits)  # one compiled forward for both
    merged = lora.merge(small.params, lora.init(small.params, ALL, jax.random.key(0)), ALL)
    np.testing.assert_array_equal(np.asarray(forward(merged)), np.asarray(forward(small.params)))


def _expected(w, a, b, name, s):
    """W + s * A B in float64, written out per kind with explicit index loops over the expert axis."""
    w, a, b = (np.asarray(x, np.float64) for x in (w, a, b))
    if name in ("q", "k"):          # W [D, X, hd], A [D, r], B [r, X, hd]
        d = (a @ b.reshape(b.shape[0], -1)).reshape(w.shape)
    elif name == "o":               # W [H, hd, D], A [H, hd, r], B [r, D]
        d = (a.reshape(-1, a.shape[-1]) @ b).reshape(w.shape)
    else:                           # gate [E, D, F] / down [E, F, D]: A [E, in, r], B [E, r, out], per expert
        d = np.stack([a[e] @ b[e] for e in range(w.shape[0])])
    return w + s * d


@pytest.mark.parametrize("layout", ["unstacked", "stacked"])
def test_merge_matches_numpy(model, layout):
    params = stacked(model.params) if layout == "stacked" else model.params
    ad = randomised(lora.init(params, ALL, jax.random.key(0)))
    merged = jax.jit(lambda p, a: lora.merge(p, a, ALL))(params, ad)
    if layout == "stacked":
        where = [(("blocks", "layers_0"), "attn", n, blk) for n in ("q", "k", "o") for blk in (0, 1)]
        where += [(("blocks", "layers_1"), "moe", n, blk) for n in ("gate", "down") for blk in (0, 1)]
    else:
        where = [(("layers_2",), "attn", n, None) for n in ("q", "k", "o")]
        where += [(("layers_3",), "moe", n, None) for n in ("gate", "down")]
    for layer, parent, name, blk in where:
        w, a, b, got = (np.asarray(walk(tree, layer + (parent, name) + end)) for tree, end in
                        ((params, ()), (ad, ("a",)), (ad, ("b",)), (merged, ())))
        if blk is not None:  # one block of the stacked layout
            w, a, b, got = w[blk], a[blk], b[blk], got[blk]
        want = _expected(w, a, b, name, ALL.scale)
        assert np.abs(want - w).max() > 0.1  # the update is not negligible
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{layer} {name} {blk}")
    # merge works on any subtree whose paths end in attn/... or moe/... (one layer, or one block inside a scan).
    one = lora.merge(walk(params, layer), walk(ad, layer), ALL)
    np.testing.assert_allclose(one["moe"]["down"], walk(merged, layer)["moe"]["down"], rtol=1e-6, atol=1e-7)
    # Unadapted weights, including the ones sharing a leaf name, come back untouched.
    for name in ("router", "shared"):
        path = layer + ("moe", name)
        for x, y in zip(jax.tree.leaves(walk(merged, path)), jax.tree.leaves(walk(params, path))):
            np.testing.assert_array_equal(x, y)


# -------------------------------------------------------------------------------------------------- logical axes

def test_logical_axes_follow_the_base_weight(model):
    base = nn.get_partition_spec(abstract_params(Llama4Text(model.config.text)))
    ax = lora.logical_axes(lora.init(model.params, ALL, jax.random.key(0)), base)
    P = jax.sharding.PartitionSpec
    assert ax["layers_1"]["attn"]["q"] == {"a": P("embed", None), "b": P(None, "heads", "head_dim")}
    assert ax["layers_1"]["attn"]["k"] == {"a": P("embed", None), "b": P(None, "kv_heads", "head_dim")}
    assert ax["layers_1"]["attn"]["o"] == {"a": P("heads", "head_dim", None), "b": P(None, "embed")}
    assert ax["layers_1"]["moe"]["gate"] == {"a": P("expert", "embed", None), "b": P("expert", None, "expert_mlp")}
    assert ax["layers_1"]["moe"]["down"] == {"a": P("expert", "expert_mlp", None), "b": P("expert", None, "embed")}
    # Scanned layout: one extra leading name on every base spec, kept by both factors.
    base_s = stacked(base, lambda s, _: P("layers", *s), is_leaf=lambda s: isinstance(s, P))
    ax_s = lora.logical_axes(lora.init(stacked(model.params), ALL, jax.random.key(0)), base_s)
    assert ax_s["blocks"]["layers_0"]["attn"]["o"] == {"a": P("layers", "heads", "head_dim", None),
                                                       "b": P("layers", None, "embed")}
    assert ax_s["blocks"]["layers_1"]["moe"]["up"] == {"a": P("layers", "expert", "embed", None),
                                                       "b": P("layers", "expert", None, "expert_mlp")}


def test_sharded_merge_and_load_match_single_device(model, tmp_path):
    mesh = l4jax.make_mesh(data=2, expert=2, tensor=2)
    rules = partitioning(model.config.text, mesh).rules
    boxed = abstract_params(Llama4Text(model.config.text))
    base_axes = nn.get_partition_spec(boxed)
    host = jax.tree.map(np.asarray, randomised(lora.init(model.params, ALL, jax.random.key(0))))
    lora_files.save(tmp_path / "a", host, ALL)
    # The trainer's path: shapes from the saved manifest, names from the base weights, arrays read in place.
    ad_axes = lora.logical_axes(lora_files.abstract(tmp_path / "a")[0], base_axes)
    ad_sh = nn.logical_to_mesh_sharding(ad_axes, mesh, rules)
    ad, _ = lora_files.load(tmp_path / "a", shardings=ad_sh)
    assert ad["layers_1"]["moe"]["gate"]["b"].sharding.shard_shape((4, 4, 128)) == (2, 4, 64)
    assert ad["layers_1"]["attn"]["q"]["b"].sharding.shard_shape((4, 4, 32)) == (4, 2, 32)
    assert ad["layers_1"]["attn"]["o"]["a"].sharding.shard_shape((4, 32, 4)) == (2, 32, 4)
    p_sh = nn.logical_to_mesh_sharding(base_axes, mesh, rules)
    params = jax.device_put(jax.tree.map(np.asarray, model.params), p_sh)
    merged = jax.jit(lambda p, a: lora.merge(p, a, ALL), out_shardings=p_sh)(params, ad)
    ref = lora.merge(model.params, host, ALL)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ training

def test_training_moves_only_the_adapters(small):
    model, params = small, small.params
    before = jax.tree.map(np.array, params)  # host copies, to compare after the steps
    ids = np.random.default_rng(5).integers(0, 512, (2, 16), dtype=np.int32)

    def loss_fn(ad):
        logits = model.module.apply({"params": lora.merge(params, ad, ALL)}, Inputs(ids)).logits
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean(), logits

    opt = optax.adam(1e-2)

    @jax.jit
    def step(ad, state):  # only the adapters are differentiated and updated; params is a closed-over constant
        (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(ad)
        updates, state = opt.update(g, state, ad)
        return optax.apply_updates(ad, updates), state, loss, logits, g

    ad = lora.init(params, ALL, jax.random.key(0))
    state = opt.init(ad)
    ad1, state, loss0, logits0, g0 = step(ad, state)
    # With B = 0 the gradient reaches B (dL/dB = s A^T x^T dL/dy) but not yet A (dL/dA = s x^T dL/dy B^T = 0).
    for path, gab in lora.adapters(g0):
        assert np.abs(gab["a"]).max() == 0.0, path
        assert np.abs(gab["b"]).max() > 1e-6, path
    ad2, state, loss1, logits1, g1 = step(ad1, state)
    for path, gab in lora.adapters(g1):
        assert np.abs(gab["a"]).max() > 1e-7, path
    loss2 = step(ad2, state)[2]
    assert float(loss2) < float(loss1) < float(loss0)
    assert np.abs(np.asarray(logits1) - np.asarray(logits0)).max() > 1e-3
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=str(path))  # the base never moved


# ---------------------------------------------------------------------------------------------------- save/load

def test_save_load_round_trip(model, tmp_path):
    for layout, params in (("u", model.params), ("s", stacked(model.params))):
        ad = randomised(lora.init(params, ALL, jax.random.key(0)))
        ad["layers_1" if layout == "u" else "blocks"] = jax.tree.map(  # a bf16 part keeps its dtype
            lambda x: x.astype(jnp.bfloat16), ad["layers_1" if layout == "u" else "blocks"])
        out = lora_files.save(tmp_path / layout, ad, ALL, base="configs/tiny.yaml")
        assert out.is_absolute() and not (tmp_path / f".{layout}.partial").exists()
        back, cfg = lora_files.load(tmp_path / layout, params=params)
        assert cfg == ALL and lora_files.read_manifest(out)["base"] == "configs/tiny.yaml"
        assert jax.tree.structure(back) == jax.tree.structure(ad)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    manifest = lora_files.read_manifest(tmp_path / "u")
    assert manifest["arrays"]["layers_1/moe/down/b"] == {"shape": [4, 4, 128], "dtype": "bfloat16"}
    assert manifest["config"] == {"rank": 4, "alpha": 8.0, "targets": ["q", "k", "v", "o"], "experts": True}


def test_save_is_atomic(model, tmp_path, monkeypatch):
    qv = LoraConfig(rank=4, alpha=4.0, targets=("q", "v"))
    first = lora.init(model.params, qv, jax.random.key(0))
    lora_files.save(tmp_path / "x", first, qv)
    with pytest.raises(FileExistsError, match="already exists"):
        lora_files.save(tmp_path / "x", first, qv)

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt  # a process killed mid-write
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        lora_files.save(tmp_path / "x", lora.init(model.params, ALL, jax.random.key(1)), ALL, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no partial folder left behind
    back, cfg = lora_files.load(tmp_path / "x")                        # and the previous save intact
    assert cfg == qv
    np.testing.assert_array_equal(back["layers_0"]["attn"]["q"]["a"], first["layers_0"]["attn"]["q"]["a"])
    second = randomised(first)
    lora_files.save(tmp_path / "x", second, qv, overwrite=True)
    np.testing.assert_array_equal(lora_files.load(tmp_path / "x")[0]["layers_0"]["attn"]["q"]["b"],
                                  second["layers_0"]["attn"]["q"]["b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# ------------------------------------------------------------------------------------------------------- errors

def test_merge_errors_name_the_key_and_shapes(model):
    params = model.params
    ad = lora.init(params, ALL, jax.random.key(0))
    with pytest.raises(LoraError, match=r"layers_0/attn/k: adapter a \(128, 4\), b \(4, 2, 32\) does not fit the "
                                        r"base weight \(128, 2, 32\) at rank 8: expected a \(128, 8\), b \(8, 2, 32\)"):
        lora.merge(params, ad, LoraConfig(rank=8, experts=True))
    with pytest.raises(LoraError, match="layers_1/moe/down: adapter present but .* does not adapt moe/down"):
        lora.merge(params, ad, LoraConfig(rank=4))
    with pytest.raises(LoraError, match="blocks/layers_0/attn/k: the base params has no 'blocks'"):
        lora.merge(params, {"blocks": ad}, ALL)  # scanned-layout adapters on unstacked params
    with pytest.raises(LoraError, match=r"layers_0/mlp/gate: not an adaptable weight"):
        lora.merge(params, {"layers_0": {"mlp": {"gate": ad["layers_0"]["attn"]["q"]}}}, ALL)
    with pytest.raises(LoraError, match="no weight in params matches"):
        lora.init({"embed": params["embed"], "layers_0": {"mlp": params["layers_0"]["mlp"]}}, ALL, jax.random.key(0))
    q2d = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    with pytest.raises(LoraError, match="layers_0/attn/q: base weight has 2 dims; a attn/q weight has 3"):
        lora.init({"layers_0": {"attn": {"q": q2d}}}, LoraConfig(), jax.random.key(0))


def test_load_errors_name_the_key_and_shapes(model, tmp_path):
    ad = lora.init(model.params, LoraConfig(rank=4, targets=("q",)), jax.random.key(0))
    lora_files.save(tmp_path / "a", ad, LoraConfig(rank=4, targets=("q",)))
    q = jax.ShapeDtypeStruct((64, 4, 32), jnp.float32)  # another model's q: D = 64
    other = dict(model.params, layers_2=dict(model.params["layers_2"], attn={"q": q}))
    with pytest.raises(LoraError, match=r"layers_2/attn/q: adapter a \(128, 4\), b \(4, 4, 32\) does not fit the "
                                        r"base weight \(64, 4, 32\)"):
        lora_files.load(tmp_path / "a", params=other)
    f = tmp_path / "a" / "lora.json"
    manifest = json.loads(f.read_text())
    manifest["arrays"]["layers_1/attn/q/b"]["shape"] = [4, 4, 16]
    f.write_text(json.dumps(manifest))
    with pytest.raises(LoraError, match=r"layers_1/attn/q/b is stored as \(4, 4, 32\) but the manifest says "
                                        r"\(4, 4, 16\)"):
        lora_files.load(tmp_path / "a")
    with pytest.raises(LoraError, match="unreadable LoRA manifest"):
        lora_files.load(tmp_path / "missing")
    f.write_text(json.dumps({"format": "l4jax-orbax", "version": 1}))
    with pytest.raises(LoraError, match="format 'l4jax-orbax' version 1; this l4jax reads 'l4jax-lora'"):
        lora_files.load(tmp_path / "a")
