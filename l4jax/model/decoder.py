"""The Llama 4 text decoder (``Llama4ForCausalLM``) as a Flax linen module: one ``Inputs`` in, one ``Output`` out.

    x = embed[ids]
    per layer i:  x += Attn_i(RMSNorm(x));  x += (MoE if i in moe_layers else MLP)(RMSNorm(x))
    logits = RMSNorm(x) @ lm_head

Parameters carry logical axis names (``axes.py``); ``nn.meta.unbox`` of the init output is a plain pytree.

Two parameter layouts: ``layers_{i}/...`` per layer (checkpoints, inference), and for training with ``scan=True``
``blocks/layers_{j}/...`` where the repeating block of ``period(cfg)`` layers is scanned and every leaf gains a
leading [L / period] axis (logical axis ``layers``), so compile time does not grow with depth.
``stack_layers``/``unstack_layers`` convert between the two.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import TextConfig
from .attention import Attention, Context
from .axes import ACT_EMBED, ACT_VOCAB, BATCH, EMBED, LAYERS, LENGTH, VOCAB, Partitioning
from .cache import KVCache, LayerKV
from .context import check_split
from .kernels import Kernels
from .layers import MLP, RMSNorm, param, project
from .quant import QArray, weight
from .masks import left_padding, positions_from_mask, segment_positions
from .moe import MoE
from .rope import inv_frequencies, rope_angles

# Rematerialisation policies by name (``Llama4Text.remat``): what the backward pass may keep instead of recompute.
REMAT_POLICIES = {
    "none": None,                                                      # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,                  # keep only the block inputs
    "dots": jax.checkpoint_policies.dots_saveable,                     # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # ... except attention's
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Inputs:
    """One forward's inputs.

    ids [B, T] int. mask [B, S] 0/1 (0 = left padding), indexed by absolute slot: S = T for a plain forward,
    S >= cache.pos + T with a cache (slots of tokens still to come count as 1); default all ones. positions [B, T]:
    RoPE positions, by default each row's count of real tokens before the slot (as transformers' generate).
    segment_ids [B, T] (1, 2, ... per packed document, 0 = padding; training, no cache): attention stays within
    each document, and positions, chunks and temperature count from each document's start. embeds [B, T, D]
    replace the embedding lookup (early fusion: image features already merged in); ids still give the shape.
    """

    ids: jax.Array
    mask: jax.Array | None = None
    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    embeds: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    """logits [B, T, V] (logical axes BATCH, LENGTH, ACT_VOCAB); cache: the KV cache with these tokens written,
    when one was given. With ``Llama4Text.logits = False``, logits is None and hidden [B, T, D] (the final norm's
    output) and head [D, V] (the LM head, the embedding's transpose when tied) are returned instead, for a loss
    that applies the head to a block of tokens at a time."""

    logits: jax.Array | None
    cache: KVCache | None = None
    hidden: jax.Array | None = None
    head: jax.Array | None = None


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
    part: Partitioning = Partitioning()
    kernels: Kernels = Kernels()
    aux_loss: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, ctx: Context, kv: LayerKV | None = None) -> tuple[jax.Array, LayerKV | None]:
        """x [B, T, D] -> (x [B, T, D], this layer's cache with the tokens written, or None)."""
        cfg, kw = self.cfg, dict(part=self.part, dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_norm")(x)
        a, kv = Attention(cfg, self.layer, kernels=self.kernels, name="attn", **kw)(h, ctx, kv)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_norm")(x)
        if cfg.is_moe(self.layer):
            with jax.named_scope("moe"):
                ff = MoE(cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, impl=self.kernels.moe,
                         aux_loss=self.aux_loss, name="moe", **kw)(h)
        else:
            ff = MLP(cfg.intermediate_size_mlp, name="mlp", **kw)(h)
        return self.part.constrain(x + ff, (BATCH, LENGTH, ACT_EMBED)), kv


class Block(nn.Module):
    """``period`` consecutive decoder layers: the unit ``nn.scan`` repeats. Scan-style (carry, out) signature."""
    cfg: TextConfig
    part: Partitioning = Partitioning()
    kernels: Kernels = Kernels()
    aux_loss: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, ctx: Context):
        for j in range(period(self.cfg)):
            x, _ = DecoderLayer(self.cfg, j, self.part, self.kernels, self.aux_loss, self.dtype, self.param_dtype,
                                name=f"layers_{j}")(x, ctx)
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
    part: Partitioning = Partitioning()  # the mesh and rules; no mesh = one device
    kernels: Kernels = Kernels()         # how the hot paths compute (kernels.py)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan: bool = False      # scanned layout (training); no KV cache then
    remat: str = "none"     # a key of REMAT_POLICIES
    aux_loss: bool = False  # MoE layers sow router loss terms into the "aux" collection
    logits: bool = True     # False: return the final hidden states and the LM head, not [B, T, V] logits

    @nn.compact
    def __call__(self, inputs: Inputs, cache: KVCache | None = None) -> Output:
        """``Inputs`` (ids [B, T], ...) -> ``Output`` (logits [B, T, V], and the cache with the T tokens written
        at slots cache.pos ... cache.pos + T - 1 when a cache is given)."""
        cfg = self.cfg
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: unknown policy {self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if (self.scan or inputs.segment_ids is not None) and cache is not None:
            raise ValueError("a KV cache cannot be used with scan=True or segment_ids (training forward only)")
        check_split(inputs.ids.shape[1], self.part)  # a long-context mesh splits the sequence evenly
        embed = param(self, "embed", (cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED), dtype=self.param_dtype)
        x = jnp.take(embed, inputs.ids, axis=0) if inputs.embeds is None else inputs.embeds
        x = self.part.constrain(x.astype(self.dtype), (BATCH, LENGTH, ACT_EMBED))
        ctx = self._context(inputs, 0 if cache is None else cache.pos, cache is not None and cache.empty)
        x, cache = self._layers(x, ctx, cache)
        x = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            head = embed.T.astype(self.dtype)
        else:
            head = param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), (EMBED, VOCAB),  # "btd,dv->btv"
                         quantized=True)
        if not self.logits:
            return Output(None, cache, x, weight(head, self.dtype))
        # A quantized head goes through project (quant.matmul for few rows); an unquantized one as it always has.
        logits = project("btd,dv->btv", x, head) if isinstance(head, QArray) else jnp.einsum("btd,dv->btv", x, head)
        logits = self.part.constrain(logits, (BATCH, LENGTH, ACT_VOCAB))
        return Output(logits, cache)

    def _context(self, inputs: Inputs, pos, cache_empty: bool) -> Context:
        """Positions, slots, validity and RoPE angles of the T fresh tokens at slots pos ... pos + T - 1."""
        cfg = self.cfg
        B, T = inputs.ids.shape
        mask, positions = inputs.mask, inputs.positions
        if mask is None:
            mask = jnp.ones((B, T), jnp.int32) if inputs.segment_ids is None else (inputs.segment_ids > 0).astype(
                jnp.int32)
        if inputs.segment_ids is not None and positions is None:
            positions = segment_positions(inputs.segment_ids)
        if positions is None:
            positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(mask), pos, T, axis=1)
        cos, sin = rope_angles(positions, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        return Context(cos, sin, pos + jnp.arange(T)[None], mask > 0, left_padding(mask), inputs.segment_ids,
                       positions if inputs.segment_ids is not None else None, cache_empty)

    def _layers(self, x: jax.Array, ctx: Context, cache: KVCache | None) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        kw = dict(part=self.part, kernels=self.kernels, aux_loss=self.aux_loss, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        policy = REMAT_POLICIES[self.remat]
        if self.scan:
            block = Block if self.remat == "none" else nn.remat(Block, policy=policy, prevent_cse=False)
            scanned = nn.scan(block, variable_axes={"params": 0, "aux": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,), length=cfg.num_hidden_layers // period(cfg),
                              metadata_params={nn.PARTITION_NAME: LAYERS})
            x, _ = scanned(cfg, name="blocks", **kw)(x, ctx)
            return x, None
        layer = DecoderLayer if self.remat == "none" else nn.remat(DecoderLayer, policy=policy)
        written = []
        for i in range(cfg.num_hidden_layers):
            x, kv = layer(cfg, i, name=f"layers_{i}", **kw)(x, ctx, None if cache is None else cache.layer(i))
            written.append(kv)
        if cache is None:
            return x, None
        return x, KVCache.of_layers(written, cache.pos + x.shape[1], self.part, self.cfg.chunked_layers)


def init_params(module: Llama4Text, key: jax.Array) -> dict:
    """Boxed random parameters (normal, std 0.02; norms at 1), each carrying its logical axis names.

    The parameters do not depend on the layout, so the init forward (a [1, 1] batch, which no batch axis divides)
    runs on one device's (``Partitioning()``); place the result with ``jax.jit(..., out_shardings=...)``."""
    one_device = module.clone(part=Partitioning())
    return one_device.init(key, Inputs(jnp.zeros((1, 1), jnp.int32)))["params"]


def abstract_params(module: Llama4Text) -> dict:
    """Boxed ShapeDtypeStructs of every parameter, carrying logical axis names; computes nothing."""
    return jax.eval_shape(lambda: init_params(module, jax.random.key(0)))
