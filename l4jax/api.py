"""Public entry points: ``load`` an HF checkpoint or ``init`` random weights, and the model handle they return."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from . import sharding as sh
from .config import Llama4Config, TextConfig, load_config
from .convert import hf, orbax
from .convert.hf_vision import vision_sources
from .gmm import IMPLS
from .model import Llama4Text
from .vision import VISION_PARAMS, ImageEncoder, check_image_tokens, check_pixels, fuse_images, tokens_per_tile


class Model:
    """A loaded Llama 4: ``.config``, ``.params`` (the text decoder's, a plain pytree), ``.vision_params`` (the
    vision tower and projector's, or None for a text-only model) and ``__call__(ids, mask, pixel_values) -> logits``.

    With a ``mesh`` the forward is one ``jax.jit`` with explicit in/out shardings: parameters on their rule
    shardings, ids and mask split over the batch axes, pixel tiles replicated, logits [B, T, V] split over batch
    and vocab.
    """

    def __init__(self, config: Llama4Config, params, *, dtype=jnp.float32, mesh=None, moe_impl: str = "scan",
                 vision_params=None):
        if moe_impl not in IMPLS:
            raise ValueError(f"moe_impl: unknown {moe_impl!r}; expected one of {IMPLS}")
        if vision_params is not None and config.vision is None:
            raise ValueError("vision_params given, but the config has no vision_config")
        self.config, self.params, self.mesh, self.dtype = config, params, mesh, jnp.dtype(dtype)
        self.vision_params = vision_params
        self.module = Llama4Text(config.text, moe_impl=moe_impl, dtype=self.dtype, param_dtype=self.dtype)
        if mesh is None:
            self.rules = sh.RULES
            self._forward = jax.jit(self._apply)
            self._forward_mm, self._embed = jax.jit(self._apply_mm), jax.jit(self._apply_embed)
        else:
            self.rules = sh.rules_for(config.text, mesh)
            tokens = sh.logical_sharding(mesh, self.rules, (sh.BATCH, sh.LENGTH))
            logits = sh.logical_sharding(mesh, self.rules, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB))
            text = param_shardings(config.text, mesh, self.dtype)
            self._forward = jax.jit(self._apply, in_shardings=(text, tokens, tokens), out_shardings=logits)
            if vision_params is not None:
                vision, whole = vision_param_shardings(config, mesh, self.dtype), jax.NamedSharding(mesh, P())
                self._forward_mm = jax.jit(self._apply_mm, in_shardings=(text, vision, tokens, tokens, whole),
                                           out_shardings=logits)
                # generate() embeds the prompt before padding the batch for the mesh: any row count, replicated.
                self._embed = jax.jit(self._apply_embed, in_shardings=(text, vision, whole, whole))

    def _apply(self, params, input_ids, attention_mask):
        with nn.logical_axis_rules(self.rules):
            return self.module.apply({"params": params}, input_ids, attention_mask)

    def _apply_embed(self, params, vision_params, input_ids, pixel_values):
        with nn.logical_axis_rules(self.rules):
            return fuse_images(self.config, params["embed"], vision_params, input_ids, pixel_values, self.dtype)

    def _apply_mm(self, params, vision_params, input_ids, attention_mask, pixel_values):
        embeds = self._apply_embed(params, vision_params, input_ids, pixel_values)
        with nn.logical_axis_rules(self.rules):
            return self.module.apply({"params": params}, input_ids, attention_mask, inputs_embeds=embeds)

    def check_images(self, input_ids: np.ndarray, pixel_values) -> np.ndarray:
        """Host-side checks of pixel_values [N, C, S, S] against the model and the prompt (one ``<|patch|>`` per
        image feature row: N * tokens_per_tile in all of input_ids); returns them as a float32 numpy array."""
        if self.vision_params is None:
            why = ("its config has no vision_config" if self.config.vision is None
                   else "it was loaded without its vision tower (vision=False)")
            raise ValueError(f"pixel_values given, but this model has no vision tower: {why}")
        px = np.asarray(pixel_values, np.float32)  # bf16 tiles (the reference's dtype) convert exactly
        vcfg = self.config.vision
        check_pixels(vcfg, px.shape)
        check_image_tokens(input_ids, px.shape[0] * tokens_per_tile(vcfg), self.config.image_token_index)
        return px

    def embed_images(self, input_ids, pixel_values) -> jax.Array:
        """Token embeddings [B, T, D] of input_ids [B, T] with the image features of pixel_values [N, C, S, S]
        written over the ``<|patch|>`` positions (early fusion); ``generate`` prefills from these."""
        ids = np.asarray(input_ids, np.int32)
        px = self.check_images(ids, pixel_values)
        if self.mesh is None:
            return self._embed(self.params, self.vision_params, jnp.asarray(ids), jnp.asarray(px))
        whole = jax.NamedSharding(self.mesh, P())
        with jax.set_mesh(self.mesh):
            return self._embed(self.params, self.vision_params, sh.put(ids, whole), sh.put(px, whole))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None) -> jax.Array:
        """input_ids [B, T] ints < vocab; attention_mask [B, T] 0/1 (0 = left padding) -> logits [B, T, V].

        pixel_values [N, C, S, S]: the tiles of every image of every row, in prompt order (``l4jax.preprocess``
        makes them); input_ids must then hold N * tokens_per_tile ``<|patch|>`` tokens, whose embeddings the image
        features replace. Under a mesh the inputs are host arrays that every process holds in full; each process
        places only its devices' rows. A batch that the batch axes do not divide is padded with empty rows, cut off
        again after. With several processes the logits are a global array: ``l4jax.distributed.to_numpy`` gathers
        them.
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
        px = None if pixel_values is None else self.check_images(ids, pixel_values)
        ids, mask = ids.astype(np.int32), mask.astype(np.int32)
        if self.mesh is None:
            if px is None:
                return self._forward(self.params, jnp.asarray(ids), jnp.asarray(mask))
            return self._forward_mm(self.params, self.vision_params, jnp.asarray(ids), jnp.asarray(mask),
                                    jnp.asarray(px))
        B = ids.shape[0]
        pad = -B % sh.batch_multiple(self.mesh)
        filler = int(self.config.image_token_index == 0)  # padding rows must hold no image token
        ids = np.pad(ids, ((0, pad), (0, 0)), constant_values=filler)
        mask = np.pad(mask, ((0, pad), (0, 0)))  # empty rows: finite garbage, never NaN
        tokens = sh.logical_sharding(self.mesh, self.rules, (sh.BATCH, sh.LENGTH))
        with jax.set_mesh(self.mesh):  # the MoE's shard_map and the activation constraints read it
            if px is None:
                out = self._forward(self.params, sh.put(ids, tokens), sh.put(mask, tokens))
            else:
                out = self._forward_mm(self.params, self.vision_params, sh.put(ids, tokens), sh.put(mask, tokens),
                                       sh.put(px, jax.NamedSharding(self.mesh, P())))
        return out[:B] if pad else out

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
                 max_length: int | None = None, callback=None, pixel_values=None) -> np.ndarray:
        """[B, T] prompt (left-padded) -> [B, T + new] tokens; ``pixel_values`` as in ``__call__`` (they enter
        the prefill only). See ``l4jax.generate.generate``."""
        from .generate import generate
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, max_length=max_length,
                        callback=callback, pixel_values=pixel_values)

    def save(self, path: str | Path, *, side_files_from: str | Path | None = None) -> Path:
        """Write the parameters (vision tower included, when loaded) as an l4jax (Orbax) checkpoint, one tensor at
        a time; ``l4jax.load`` reads it back onto any mesh. With several processes every process calls it and
        writes only its own shards. ``side_files_from``: a folder whose tokenizer and generation files are copied
        beside the weights."""
        trees = {**self.params, **(self.vision_params or {})}
        leaves = jax.tree_util.tree_flatten_with_path(trees)[0]
        items = ((tuple(k.key for k in keys), leaf) for keys, leaf in leaves)
        # A model without its vision weights is saved as the text-only model it is.
        config = self.config if self.vision_params is not None else dataclasses.replace(self.config, vision=None)
        return orbax.save(items, path, config=config.to_hf(), dtype=self.dtype.name, side_files_from=side_files_from)

    def num_params(self) -> int:
        trees = (self.params, self.vision_params or {})
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trees))


def abstract_params(cfg: TextConfig, dtype=jnp.float32):
    """Boxed ShapeDtypeStructs of every parameter, carrying logical axis names; computes nothing."""
    module = Llama4Text(cfg, dtype=dtype, param_dtype=dtype)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def param_shardings(cfg: TextConfig, mesh, dtype=jnp.float32):
    """NamedSharding per parameter: its logical axis names through ``sharding.rules_for(cfg, mesh)``."""
    boxed = abstract_params(cfg, dtype)
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sh.rules_for(cfg, mesh))


def abstract_vision_params(config: Llama4Config, dtype=jnp.float32):
    """Boxed ShapeDtypeStructs of the vision tower and projector (``vision_model``, ``projector``)."""
    v = config.vision
    encoder = ImageEncoder(v, config.text.hidden_size, dtype=dtype, param_dtype=dtype)
    pixels = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), dtype)
    return jax.eval_shape(lambda: encoder.init(jax.random.key(0), pixels))["params"]


def vision_param_shardings(config: Llama4Config, mesh, dtype=jnp.float32):
    """NamedSharding per vision parameter through the same rules as the text (``sharding.rules_for``).

    ``rules_for`` checks divisibility against the text decoder's sizes; the vision tower's sizes are unrelated (and
    tiny next to the text: 0.9B of Scout's 109B), so a mesh axis that does not divide one of its dimensions is
    dropped for that dimension, i.e. it is replicated there, instead of refusing a mesh that fits the text.
    """
    rules = sh.rules_for(config.text, mesh)
    boxed = abstract_vision_params(config, dtype)
    shapes = nn.meta.unbox(boxed)

    def fit(spec, leaf):
        axes = nn.logical_to_mesh_axes(spec, rules)
        size = lambda a: math.prod(mesh.shape[n] for n in ((a,) if isinstance(a, str) else a))  # noqa: E731
        return jax.NamedSharding(mesh, P(*(a if a is None or d % size(a) == 0 else None
                                           for a, d in zip(axes, leaf.shape))))

    return jax.tree.map(fit, nn.get_partition_spec(boxed), shapes, is_leaf=lambda x: isinstance(x, P))


def _resolve_vision(config: Llama4Config, vision: bool | None, where) -> Llama4Config:
    """``vision`` None means: with the vision tower when the config has one. Without it, the config drops its
    vision part, so the handle (and what it saves) is the text-only model."""
    if vision and config.vision is None:
        raise ValueError(f"{where}: vision=True, but the config has no vision_config (a text-only model)")
    if vision is False and config.vision is not None:
        return dataclasses.replace(config, vision=None)
    return config


def init(config: Llama4Config | TextConfig | str, *, dtype=jnp.float32, seed: int = 0, mesh=None,
         moe_impl: str = "scan", vision: bool | None = None) -> Model:
    """Random weights (normal, std 0.02; norms at 1), created directly in their shardings when a mesh is given.

    With a mesh the initialiser is one jit whose outputs are the parameter shardings: the partitioner splits the
    (partitionable threefry) random generation, so each device computes only its own shards. The vision tower is
    included when the config has one, unless ``vision=False``.
    """
    if not isinstance(config, Llama4Config):
        config = Llama4Config(text=config) if isinstance(config, TextConfig) else load_config(config)
    config = _resolve_vision(config, vision, "init")
    module = Llama4Text(config.text, dtype=dtype, param_dtype=dtype)
    make = lambda key: nn.meta.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])  # noqa: E731
    out_shardings = None if mesh is None else param_shardings(config.text, mesh, dtype)
    params = jax.jit(make, out_shardings=out_shardings)(jax.random.key(seed))
    vision_params = None
    if config.vision is not None:
        v = config.vision
        encoder = ImageEncoder(v, config.text.hidden_size, dtype=dtype, param_dtype=dtype)
        pixels = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), dtype)
        make_v = lambda key: nn.meta.unbox(encoder.init(key, pixels)["params"])  # noqa: E731
        out_v = None if mesh is None else vision_param_shardings(config, mesh, dtype)
        vision_params = jax.jit(make_v, out_shardings=out_v)(jax.random.fold_in(jax.random.key(seed), 1))
    return Model(config, params, dtype=dtype, mesh=mesh, moe_impl=moe_impl, vision_params=vision_params)


def load(path: str | Path, *, dtype=None, mesh=None, moe_impl: str = "scan", vision: bool | None = None) -> Model:
    """Load an HF Llama 4 folder (config.json + safetensors, single or sharded) or an l4jax checkpoint written by
    ``l4jax convert``.

    A full ``llama4`` checkpoint (``language_model.*``, ``vision_model.*``, ``multi_modal_projector.*``) loads
    with its vision tower, so the handle accepts ``pixel_values``; ``vision=False`` loads the text decoder only
    (the vision tensors are then never read). ``dtype`` defaults to the checkpoint's dtype. With a ``mesh`` each
    tensor is placed on its sharding as it is read, so no device holds the whole model; with several processes
    (``l4jax.distributed``) every process reads the checkpoint and places only the shards of its own devices.
    """
    path = Path(path)
    if orbax.is_checkpoint(path):
        manifest = orbax.read_manifest(path)
        config = _resolve_vision(Llama4Config.from_hf(manifest["config"]), vision, path)
        stored = jnp.dtype(manifest["dtype"])
        dtype = jnp.dtype(dtype) if dtype is not None else stored
        abstract = nn.meta.unbox(abstract_params(config.text, stored))
        shardings = None if mesh is None else param_shardings(config.text, mesh, dtype)
        if config.vision is not None:
            if not any(n.split("/")[0] in VISION_PARAMS for n in manifest["params"]):
                raise ValueError(f"{path}: the config has a vision_config but the checkpoint holds no vision "
                                 f"weights (converted text-only?); load it with vision=False")
            abstract.update(nn.meta.unbox(abstract_vision_params(config, stored)))
            if mesh is not None:
                shardings = {**shardings, **vision_param_shardings(config, mesh, dtype)}
        restored = orbax.restore(path, abstract, shardings, dtype,
                                 ignore=VISION_PARAMS if config.vision is None else ())
        params = {k: v for k, v in restored.items() if k not in VISION_PARAMS}
        vision_params = {k: restored[k] for k in VISION_PARAMS} if config.vision is not None else None
        return Model(config, params, dtype=dtype, mesh=mesh, moe_impl=moe_impl, vision_params=vision_params)
    config = _resolve_vision(load_config(path), vision, path)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(hf.checkpoint_dtype(path))
    expected = nn.meta.unbox(abstract_params(config.text, dtype))
    shardings = None if mesh is None else param_shardings(config.text, mesh, dtype)
    extra = ()
    if config.vision is not None:
        extra = vision_sources(config.vision, config.text.hidden_size)
        expected.update(nn.meta.unbox(abstract_vision_params(config, dtype)))
        if mesh is not None:
            shardings = {**shardings, **vision_param_shardings(config, mesh, dtype)}
    params: dict = {}
    for p, host in hf.stream(path, config.text, dtype, extra=extra):
        want = _get(expected, p)
        if host.shape != want.shape:  # a converter bug, not a user error
            raise AssertionError(f"{'/'.join(p)}: converted shape {host.shape} != model shape {want.shape}")
        # One tensor at a time; with a mesh each device receives only its shard (each process places its own).
        _set(params, p, sh.put(host, None if shardings is None else _get(shardings, p)))
    vision_params = {k: params.pop(k) for k in VISION_PARAMS} if config.vision is not None else None
    return Model(config, params, dtype=dtype, mesh=mesh, moe_impl=moe_impl, vision_params=vision_params)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
