"""The Llama 4 text decoder (``Llama4ForCausalLM``) as a Flax linen module.

    x = embed[ids]
    per layer i:  x += Attn_i(RMSNorm(x));  x += (MoE if i in moe_layers else MLP)(RMSNorm(x))
    logits = RMSNorm(x) @ lm_head

Parameters carry logical axis names (``sharding.py``); ``nn.meta.unbox`` of the init output is a plain pytree.

Two parameter layouts: ``layers_{i}/...`` per layer (checkpoints, inference), and for training with ``scan=True``
``blocks/layers_{j}/...`` where the repeating block of ``period(cfg)`` layers is scanned and every leaf gains a
leading [L / period] axis (logical axis ``layers``), so compile time does not grow with depth.
``stack_layers``/``unstack_layers`` convert between the two.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh
from .attention import Attention
from .config import TextConfig
from .masks import left_padding, positions_from_mask, segment_positions
from .mlp import INIT, MLP
from .moe import MoE
from .norm import RMSNorm
from .rope import inv_frequencies, rope_angles


# Rematerialisation policies by name (``Llama4Text.remat``): what the backward pass may keep instead of recompute.
REMAT_POLICIES = {
    "none": None,                                                      # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,                  # keep only the block inputs
    "dots": jax.checkpoint_policies.dots_saveable,                     # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # ... except attention's
}


def layer_kind(cfg: TextConfig, i: int) -> tuple[bool, bool, bool]:
    return cfg.is_moe(i), cfg.rope_layers[i], cfg.chunked_layers[i]


def period(cfg: TextConfig) -> int:
    """The shortest block length p dividing the depth such that layer i is of the same kind as layer i % p.

    4 for Scout and Maverick (the NoPE interval 4 and MoE step 1 or 2); the depth itself if the layer lists have
    no repeating pattern (then scanning saves nothing, but stays correct).
    """
    n = cfg.num_hidden_layers
    for p in range(1, n + 1):
        if n % p == 0 and all(layer_kind(cfg, i) == layer_kind(cfg, i % p) for i in range(n)):
            return p
    return n


class DecoderLayer(nn.Module):
    cfg: TextConfig
    layer: int  # its index, or its index within a scanned block: only its kind matters
    moe_impl: str = "scan"
    aux_loss: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, q_index, token_valid, left_pad, cache=None, segments=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_norm")(x)
        a, cache = Attention(cfg, self.layer, name="attn", **kw)(h, cos, sin, q_index, token_valid, left_pad, cache,
                                                                 segments)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_norm")(x)
        if cfg.is_moe(self.layer):
            with jax.named_scope("moe"):
                ff = MoE(cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, self.moe_impl,
                         self.aux_loss, name="moe", **kw)(h)
        else:
            ff = MLP(cfg.intermediate_size_mlp, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x + ff, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), cache


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Zeroed KV cache: {"layers_i": {"k", "v"}} each [B, L, K, hd].

    Chunked (RoPE) layers keep a ring of L = attention_chunk_size entries, since a query never sees past the start
    of its own chunk; global (NoPE) layers keep L = max_len. For Scout at long context that is ~3/4 less memory
    than a full-length cache on every layer.
    """
    def length(i):
        return min(cfg.attention_chunk_size, max_len) if cfg.chunked_layers[i] else max_len
    shape = lambda i: (batch, length(i), cfg.num_key_value_heads, cfg.head_dim)  # noqa: E731
    return {f"layers_{i}": {"k": jnp.zeros(shape(i), dtype), "v": jnp.zeros(shape(i), dtype)}
            for i in range(cfg.num_hidden_layers)}


CACHE_AXES = (sh.BATCH, None, sh.ACT_KV_HEADS, None)  # logical axes of every cache entry


class Block(nn.Module):
    """``period`` consecutive decoder layers: the unit ``nn.scan`` repeats. Scan-style (carry, out) signature."""
    cfg: TextConfig
    period: int
    moe_impl: str = "scan"
    aux_loss: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, q_index, token_valid, left_pad, segments):
        for j in range(self.period):
            x, _ = DecoderLayer(self.cfg, j, self.moe_impl, self.aux_loss, self.dtype, self.param_dtype,
                                name=f"layers_{j}")(x, cos, sin, q_index, token_valid, left_pad, None, segments)
        return x, None


def stack_layers(params: dict, cfg: TextConfig) -> dict:
    """Per-layer layout -> scanned layout: ``blocks/layers_{j}`` stacks layers j, j + p, j + 2p, ... on axis 0."""
    p = period(cfg)
    n = cfg.num_hidden_layers // p
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["blocks"] = {f"layers_{j}": jax.tree.map(lambda *ls: jnp.stack(ls), *[params[f"layers_{b * p + j}"]
                                                                               for b in range(n)])
                     for j in range(p)}
    return out


def unstack_layers(params: dict, cfg: TextConfig) -> dict:
    """Scanned layout -> per-layer layout (the inverse of ``stack_layers``)."""
    p = period(cfg)
    out = {k: v for k, v in params.items() if k != "blocks"}
    for j in range(p):
        sub = params["blocks"][f"layers_{j}"]
        for b in range(cfg.num_hidden_layers // p):
            out[f"layers_{b * p + j}"] = jax.tree.map(lambda a, b=b: a[b], sub)
    return out


class Llama4Text(nn.Module):
    cfg: TextConfig
    moe_impl: str = "scan"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan: bool = False     # scanned layout (training); no KV cache then
    remat: str = "none"    # a key of REMAT_POLICIES
    aux_loss: bool = False  # MoE layers sow router loss terms into the "aux" collection

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: dict | None = None, offset: jax.Array | int = 0,
                 inputs_embeds: jax.Array | None = None, segment_ids: jax.Array | None = None):
        """input_ids [B, T] int -> logits [B, T, V]; with a ``cache``, returns (logits, updated cache).

        attention_mask [B, S] (1 = token, 0 = left padding) is indexed by absolute slot: S = T for a plain forward,
        S >= offset + T with a cache (slots of tokens still to come count as 1). ``offset`` is the number of tokens
        already in the cache. RoPE positions default to each row's count of real tokens before the slot (as
        transformers' generate); chunk boundaries start at each row's first real token. ``inputs_embeds`` [B, T, D]
        replaces the token embedding lookup (early fusion: image features already merged in); input_ids still
        give the shape. ``segment_ids`` [B, T] (1, 2, ... per packed document, 0 = padding; no cache) restricts
        attention to each document, and positions, chunks and temperature count from each document's start.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: unknown policy {self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if (self.scan or segment_ids is not None) and cache is not None:
            raise ValueError("a KV cache cannot be used with scan=True or segment_ids (training forward only)")
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32) if segment_ids is None else (segment_ids > 0).astype(jnp.int32)
        segments = None
        if segment_ids is not None:
            positions = segment_positions(segment_ids) if positions is None else positions
            segments = (segment_ids, positions)
        if positions is None:
            positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), offset, T, axis=1)
        embed = self.param("embed", nn.with_logical_partitioning(INIT, (sh.VOCAB, sh.EMBED)),
                           (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        x = jnp.take(embed, input_ids, axis=0) if inputs_embeds is None else inputs_embeds
        x = x.astype(self.dtype)
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))

        cos, sin = rope_angles(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        q_index = offset + jnp.arange(T)[None]
        valid, pad = attention_mask > 0, left_padding(attention_mask)
        new_cache = {}
        policy = REMAT_POLICIES[self.remat]
        if self.scan:
            p = period(cfg)
            block = Block if self.remat == "none" else nn.remat(Block, policy=policy, prevent_cse=False)
            scanned = nn.scan(block, variable_axes={"params": 0, "aux": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 6, length=cfg.num_hidden_layers // p,
                              metadata_params={nn.PARTITION_NAME: sh.LAYERS})
            x, _ = scanned(cfg, p, self.moe_impl, self.aux_loss, self.dtype, self.param_dtype, name="blocks")(
                x, cos, sin, q_index, valid, pad, segments)
        layer = DecoderLayer if self.remat == "none" else nn.remat(DecoderLayer, policy=policy)
        for i in range(0 if self.scan else cfg.num_hidden_layers):
            name = f"layers_{i}"
            x, c = layer(cfg, i, self.moe_impl, self.aux_loss, self.dtype, self.param_dtype, name=name)(
                x, cos, sin, q_index, valid, pad, None if cache is None else cache[name], segments)
            if cache is not None:
                new_cache[name] = jax.tree.map(lambda a: nn.with_logical_constraint(a, CACHE_AXES), c)
        x = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            head = embed.T
        else:
            head = self.param("lm_head", nn.with_logical_partitioning(INIT, (sh.EMBED, sh.VOCAB)),
                              (cfg.hidden_size, cfg.vocab_size), self.param_dtype)
        logits = jnp.einsum("btd,dv->btv", x, head.astype(self.dtype))
        logits = nn.with_logical_constraint(logits, (sh.BATCH, sh.LENGTH, sh.ACT_VOCAB))
        return logits if cache is None else (logits, new_cache)
