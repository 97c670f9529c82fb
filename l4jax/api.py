"""Public entry points: ``load`` an HF checkpoint or ``init`` random weights, and the model handle they return."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import sharding as sh
from .config import Llama4Config, TextConfig, load_config
from .convert import hf, orbax
from .gmm import IMPLS
from .model import Llama4Text


class Model:
    """A loaded Llama 4: ``.config``, ``.params`` (a plain pytree) and ``__call__(ids, mask) -> logits``.

    With a ``mesh`` the forward is one ``jax.jit`` with explicit in/out shardings: parameters on their rule
    shardings, ids and mask split over the batch axes, logits [B, T, V] split over batch and vocab.
    """

    def __init__(self, config: Llama4Config, params, *, dtype=jnp.float32, mesh=None, moe_impl: str = "scan"):
        if moe_impl not in IMPLS:
            raise ValueError(f"moe_impl: unknown {moe_impl!r}; expected one of {IMPLS}")
        self.config, self.params, self.mesh, self.dtype = config, params, mesh, jnp.dtype(dtype)
        self.module = Llama4Text(config.text, moe_impl=moe_impl, dtype=self.dtype, param_dtype=self.dtype)
        if mesh is None:
            self.rules = sh.RULES
            self._forward = jax.jit(self._apply)
        else:
            self.rules = sh.rules_for(config.text, mesh)
            tokens = sh.logical_sharding(mesh, self.rules, (sh.BATCH, sh.LENGTH))
            self._forward = jax.jit(
                self._apply,
                in_shardings=(param_shardings(config.text, mesh, self.dtype), tokens, tokens),
                out_shardings=sh.logical_sharding(mesh, self.rules, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB)))

    def _apply(self, params, input_ids, attention_mask):
        with nn.logical_axis_rules(self.rules):
            return self.module.apply({"params": params}, input_ids, attention_mask)

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        """input_ids [B, T] ints < vocab; attention_mask [B, T] 0/1 (0 = left padding) -> logits [B, T, V].

        Under a mesh the inputs are host arrays that every process holds in full; each process places only its
        devices' rows. A batch that the batch axes do not divide is padded with empty rows, cut off again after.
        With several processes the logits are a global array: ``l4jax.distributed.to_numpy`` gathers them.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids: expected a 2-D integer array [B, T], got shape {ids.shape} {ids.dtype}")
        V = self.config.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"input_ids: token ids must be in [0, {V}), found {ids.min()}..{ids.max()}")
        mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
        if self.mesh is None:
            return self._forward(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        B = ids.shape[0]
        pad = -B % sh.batch_multiple(self.mesh)
        ids = np.pad(ids.astype(np.int32), ((0, pad), (0, 0)))
        mask = np.pad(mask.astype(np.int32), ((0, pad), (0, 0)))  # empty rows: finite garbage, never NaN
        tokens = sh.logical_sharding(self.mesh, self.rules, (sh.BATCH, sh.LENGTH))
        with jax.set_mesh(self.mesh):  # the MoE's shard_map and the activation constraints read it
            out = self._forward(self.params, sh.put(ids, tokens), sh.put(mask, tokens))
        return out[:B] if pad else out

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
                 max_length: int | None = None, callback=None) -> np.ndarray:
        """[B, T] prompt (left-padded) -> [B, T + new] tokens. See ``l4jax.generate.generate``."""
        from .generate import generate
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, max_length=max_length,
                        callback=callback)

    def save(self, path: str | Path) -> Path:
        """Write the parameters as an l4jax (Orbax) checkpoint, one tensor at a time; ``l4jax.load`` reads it back
        onto any mesh. With several processes every process calls it and writes only its own shards."""
        leaves = jax.tree_util.tree_flatten_with_path(self.params)[0]
        items = ((tuple(k.key for k in keys), leaf) for keys, leaf in leaves)
        return orbax.save(items, path, config=self.config.to_hf(), dtype=self.dtype.name)

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def abstract_params(cfg: TextConfig, dtype=jnp.float32):
    """Boxed ShapeDtypeStructs of every parameter, carrying logical axis names; computes nothing."""
    module = Llama4Text(cfg, dtype=dtype, param_dtype=dtype)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def param_shardings(cfg: TextConfig, mesh, dtype=jnp.float32):
    """NamedSharding per parameter: its logical axis names through ``sharding.rules_for(cfg, mesh)``."""
    boxed = abstract_params(cfg, dtype)
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sh.rules_for(cfg, mesh))


def init(config: Llama4Config | TextConfig | str, *, dtype=jnp.float32, seed: int = 0, mesh=None,
         moe_impl: str = "scan") -> Model:
    """Random weights (normal, std 0.02; norms at 1), created directly in their shardings when a mesh is given.

    With a mesh the initialiser is one jit whose outputs are the parameter shardings: the partitioner splits the
    (partitionable threefry) random generation, so each device computes only its own shards.
    """
    if not isinstance(config, Llama4Config):
        config = Llama4Config(text=config) if isinstance(config, TextConfig) else load_config(config)
    module = Llama4Text(config.text, dtype=dtype, param_dtype=dtype)
    make = lambda key: nn.meta.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])  # noqa: E731
    out_shardings = None if mesh is None else param_shardings(config.text, mesh, dtype)
    params = jax.jit(make, out_shardings=out_shardings)(jax.random.key(seed))
    return Model(config, params, dtype=dtype, mesh=mesh, moe_impl=moe_impl)


def load(path: str | Path, *, dtype=None, mesh=None, moe_impl: str = "scan") -> Model:
    """Load an HF Llama 4 folder (config.json + safetensors, single or sharded) or an l4jax checkpoint written by
    ``l4jax convert``. Text weights only for now.

    ``dtype`` defaults to the checkpoint's dtype. With a ``mesh`` each tensor is placed on its sharding as it is
    read, so no device holds the whole model; with several processes (``l4jax.distributed``) every process reads
    the checkpoint and places only the shards of its own devices.
    """
    path = Path(path)
    if orbax.is_checkpoint(path):
        manifest = orbax.read_manifest(path)
        config = Llama4Config.from_hf(manifest["config"])
        stored = jnp.dtype(manifest["dtype"])
        dtype = jnp.dtype(dtype) if dtype is not None else stored
        shardings = None if mesh is None else param_shardings(config.text, mesh, dtype)
        params = orbax.restore(path, nn.meta.unbox(abstract_params(config.text, stored)), shardings, dtype)
        return Model(config, params, dtype=dtype, mesh=mesh, moe_impl=moe_impl)
    config = load_config(path)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(hf.checkpoint_dtype(path))
    boxed = abstract_params(config.text, dtype)
    expected = nn.meta.unbox(boxed)
    shardings = None if mesh is None else param_shardings(config.text, mesh, dtype)
    params: dict = {}
    for p, host in hf.stream(path, config.text, dtype):
        want = _get(expected, p)
        if host.shape != want.shape:  # a converter bug, not a user error
            raise AssertionError(f"{'/'.join(p)}: converted shape {host.shape} != model shape {want.shape}")
        # One tensor at a time; with a mesh each device receives only its shard (each process places its own).
        _set(params, p, sh.put(host, None if shardings is None else _get(shardings, p)))
    return Model(config, params, dtype=dtype, mesh=mesh, moe_impl=moe_impl)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
