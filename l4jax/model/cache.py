"""The KV cache: a registered dataclass pytree that knows its own shapes, logical axes and shardings.

Layer i keeps k[i] [B, K, L_i, hd] and v[i] [B, K, hd, L_i] (logical axes ``KVCache.axes``): chunked (RoPE)
layers a ring of L_i = attention_chunk_size entries, since a query never sees past the start of its own chunk;
global (NoPE) layers L_i = S, the whole run. For Scout at long context that is ~3/4 less memory than a full-length
cache on every layer.
``pos`` counts the tokens written so far: the next token goes to absolute slot ``pos``, which a ring stores at
entry ``pos % L_i``. ``empty`` (static: part of the tree's structure, not an array) is True for a cache fresh from
``init`` or ``abstract``: a prefill into it scores only the prompt's own keys, never the empty slots.

An int8 cache (``dtype=jnp.int8``) stores each token's k and v per kv head as int8 with one fp32 scale,
k_scale[i] and v_scale[i] [B, K, L_i] (symmetric, max |x| / 127): 0.52x the bytes of a bf16 cache at hd = 128.
The attention applies the scales to the scores and the probabilities, so no dequantized copy is ever made.

The layouts are the ones the decode step's two matmuls want, with the contracted axis last (hd for q k^T, the slots
L for p v): XLA carries a while loop's state in the layout its body prefers, so a cache stored otherwise would be
transposed on the way into the decode loop and back out of it, a full copy of the cache per device call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import TextConfig
from .axes import ACT_KV_HEADS, BATCH, CACHE_LENGTH, Partitioning


class LayerKV(NamedTuple):
    """One layer's cache: k [B, K, L, hd], v [B, K, hd, L]; an int8 cache's scales k_scale, v_scale [B, K, L]."""
    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def length(self) -> int:
        return self.k.shape[2]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "k_scale", "v_scale", "pos"],
                   meta_fields=["empty"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, L_i, hd]
    v: tuple[jax.Array, ...]  # per layer [B, K, hd, L_i]
    k_scale: tuple[jax.Array, ...] | None  # int8 caches: per layer [B, K, L_i] fp32; otherwise None
    v_scale: tuple[jax.Array, ...] | None
    pos: jax.Array            # [] int32: tokens written so far
    empty: bool = False       # static: nothing written yet

    @staticmethod
    def axes(chunked: bool) -> dict[str, tuple]:
        """Logical axes of one layer's k, v, k_scale and v_scale: a global layer's slots are ``CACHE_LENGTH`` (split
        over the sequence's mesh axes on a long-context mesh: each device holds its part of the prompt's keys); a
        chunked layer's ring of one chunk is kept whole."""
        L = None if chunked else CACHE_LENGTH
        return {"k": (BATCH, ACT_KV_HEADS, L, None), "v": (BATCH, ACT_KV_HEADS, None, L),
                "k_scale": (BATCH, ACT_KV_HEADS, L), "v_scale": (BATCH, ACT_KV_HEADS, L)}

    @staticmethod
    def lengths(cfg: TextConfig, max_len: int) -> tuple[int, ...]:
        """Entries per layer: the chunk on chunked layers (at most max_len), max_len on global ones."""
        return tuple(min(cfg.attention_chunk_size, max_len) if chunked else max_len for chunked in cfg.chunked_layers)

    @classmethod
    def abstract(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32,
                 part: Partitioning = Partitioning()) -> "KVCache":
        """ShapeDtypeStructs of a cache for ``batch`` rows of ``max_len`` slots, on ``part``'s shardings; ``dtype``
        int8 adds the scales."""
        def sds(shape, dt, chunked, field):
            sharding = None if part.mesh is None else part.sharding(cls.axes(chunked)[field], shape)
            return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

        K, hd = cfg.num_key_value_heads, cfg.head_dim
        layers = list(zip(cls.lengths(cfg, max_len), cfg.chunked_layers))
        k = tuple(sds((batch, K, n, hd), dtype, c, "k") for n, c in layers)
        v = tuple(sds((batch, K, hd, n), dtype, c, "v") for n, c in layers)
        scales = None
        if jnp.dtype(dtype) == jnp.int8:
            scales = tuple(sds((batch, K, n), jnp.float32, c, "k_scale") for n, c in layers)
        pos = jax.ShapeDtypeStruct((), jnp.int32, sharding=None if part.mesh is None else NamedSharding(part.mesh, P()))
        return cls(k, v, scales, scales, pos, empty=True)

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32,
             part: Partitioning = Partitioning()) -> "KVCache":
        """A zeroed cache, created directly on its shardings (each device allocates only its shard)."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding),
                            cls.abstract(cfg, batch, max_len, dtype, part))

    @classmethod
    def of_layers(cls, layers: list[LayerKV], pos: jax.Array, part: Partitioning,
                  chunked: tuple[bool, ...]) -> "KVCache":
        """The cache of per-layer caches (each constrained to its logical axes: ``axes(chunked[i])``), ``pos``
        tokens written."""
        def each(field):
            got = [getattr(kv, field) for kv in layers]
            return None if got[0] is None else tuple(part.constrain(x, cls.axes(c)[field])
                                                     for x, c in zip(got, chunked))
        return cls(each("k"), each("v"), each("k_scale"), each("v_scale"), pos, empty=False)

    def layer(self, i: int) -> LayerKV:
        if self.k_scale is None:
            return LayerKV(self.k[i], self.v[i])
        return LayerKV(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    def length(self, i: int) -> int:
        """Entries of layer i (its slots L_i)."""
        return self.k[i].shape[2]


def cached_slots(length: int, n: jax.Array) -> jax.Array:
    """Absolute slot held by each of ``length`` cache entries after ``n`` tokens were written; -1 where empty.

    Entry e holds the latest slot i < n with i % length == e. For a full-length cache that is just e (if e < n);
    for a chunk-sized ring it is the last ``length`` slots, which is all a chunked layer can ever see.
    """
    e = jnp.arange(length)
    i = e + length * jnp.floor_divide(n - 1 - e, length)
    return jnp.where(i >= 0, i, -1)


def quantize(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 along ``axis``: x ~ q * scale, q in [-127, 127], scale = max |x| / 127 (x's other axes)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axis) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero vector stores zeros with scale 0
    q = jnp.clip(jnp.round(x / jnp.expand_dims(safe, axis)), -127, 127).astype(jnp.int8)
    return q, scale


def write(kv: LayerKV, k: jax.Array, v: jax.Array, q_index: jax.Array) -> LayerKV:
    """Store the newest k, v [B, T, K, hd] at entries slot % L (only the last L if T is longer) of a layer's
    cache (quantized first if it is int8).

    One token (a decode step) is a dynamic-update-slice, which XLA does in place in a donated cache; more are a
    scatter (a prefill, which writes every entry anyway)."""
    length, T = kv.length, k.shape[1]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # [B, K, T, hd], [B, K, hd, T]
    if kv.k_scale is not None:
        (kq, ks), (vq, vs) = quantize(k, -1), quantize(v, -2)
        new, axes = [kq, vq, ks, vs], [2, 3, 2, 2]  # the axis of the slots in each
    else:
        new, axes = [k.astype(kv.k.dtype), v.astype(kv.v.dtype)], [2, 3]
    old = [x for x in kv if x is not None]
    if T == 1:
        entry = q_index[0, 0] % length
        out = [jax.lax.dynamic_update_slice_in_dim(c, x, entry, a) for c, x, a in zip(old, new, axes)]
    else:
        start = T - min(T, length)
        entries = q_index[0, start:] % length
        out = [c.at[(slice(None),) * a + (entries,)].set(jax.lax.slice_in_dim(x, start, T, axis=a))
               for c, x, a in zip(old, new, axes)]
    return LayerKV(*out)


def as_keys(kv: LayerKV, dtype) -> tuple[jax.Array, jax.Array]:
    """A layer's cache in the fresh keys' layout, k and v [B, L, K, hd] (dequantized), to score it beside fresh
    keys."""
    k, v = kv.k, kv.v
    if kv.k_scale is not None:
        k, v = k * kv.k_scale[..., None], v * kv.v_scale[:, :, None]  # int8 * fp32 -> fp32
    return k.transpose(0, 2, 1, 3).astype(dtype), v.transpose(0, 3, 1, 2).astype(dtype)
