"""Grouped-query attention with Llama 4's per-layer variants.

RoPE layers: interleaved RoPE, then (if ``use_qk_norm``) a weightless RMS norm of q and k per head, and the
chunked causal mask. NoPE layers: no RoPE, no QK-norm, query temperature tuning (if ``attn_temperature_tuning``)
and the global causal mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import sharding as sh
from .config import TextConfig
from .masks import temperature_scales
from .mlp import INIT
from .norm import rms_normalize
from .rope import apply_rope


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale + mask) v with GQA.

    q [B, T, H, hd]; k, v [B, S, K, hd]; mask [B, T, S] bool. Query head h reads kv head h // (H/K).
    The softmax is taken in fp32 (the reference's eager path keeps the input dtype; identical in fp32).
    Rows with no visible key (padding queries) give finite garbage, never NaN.
    """
    B, T, H, hd = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, hd)


class Attention(nn.Module):
    cfg: TextConfig
    layer: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 q_index: jax.Array) -> jax.Array:
        """x [B, T, D]; cos/sin [B, T, hd/2]; mask [B, T, T] bool; q_index [1|B, T] absolute cache slots."""
        cfg = self.cfg
        D, H, K, hd = x.shape[-1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        use_rope = cfg.rope_layers[self.layer]
        p = lambda name, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(INIT, axes), shape, self.param_dtype).astype(self.dtype)
        wq = p("q", (D, H, hd), (sh.EMBED, sh.HEADS, sh.HEAD_DIM))     # "btd,dhk->bthk"
        wk = p("k", (D, K, hd), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))  # "btd,dhk->bthk"
        wv = p("v", (D, K, hd), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM))  # "btd,dhk->bthk"
        wo = p("o", (H, hd, D), (sh.HEADS, sh.HEAD_DIM, sh.EMBED))     # "bthk,hkd->btd"

        q = jnp.einsum("btd,dhk->bthk", x, wq)
        k = jnp.einsum("btd,dhk->bthk", x, wk)
        v = jnp.einsum("btd,dhk->bthk", x, wv)
        q = nn.with_logical_constraint(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None))
        k = nn.with_logical_constraint(k, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, None))
        v = nn.with_logical_constraint(v, (sh.BATCH, sh.LENGTH, sh.ACT_KV_HEADS, None))
        if use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cfg.use_qk_norm:  # after RoPE, per head, no weight, eps = rms_norm_eps
                q, k = rms_normalize(q, cfg.rms_norm_eps), rms_normalize(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            s = temperature_scales(q_index, cfg.floor_scale, cfg.attn_scale)  # [1|B, T] fp32
            q = (q.astype(jnp.float32) * s[:, :, None, None]).astype(q.dtype)
        with jax.named_scope("chunked_attention" if cfg.chunked_layers[self.layer] else "global_attention"):
            out = attend(q, k, v, mask, hd ** -0.5)
        return jnp.einsum("bthk,hkd->btd", out, wo)
