"""The Llama 4 vision tower (HF ``Llama4VisionModel``), the projector, and the merge of image features into text.

Per tile (N tiles of all images concatenated, C = 3 channels, S = image_size, p = patch_size, G = S/p, P = G^2
patches, D = vision width, F = vision MLP width):

    x = patches(pixels) @ W_patch                     [N, P, D]   (unfold: row-major patches, (c, ky, kx) inside)
    x = concat(x, cls) + pos_embed; x = LN_pre(x)      [N, P+1, D] (the CLS token is LAST)
    per layer: x += Attn(LN1(x)); x += fc2(gelu(fc1(LN2(x))))      (bidirectional, 2D RoPE, biases everywhere)
    x = LN_post(x)[:, :P]                              [N, P, D]   (CLS dropped)
    x = pixel_shuffle(x)                               [N, P r^2, D / r^2]   (r = pixel_shuffle_ratio)
    x = gelu(gelu(x @ fc1) @ fc2)                      [N, P', Dv] (the vision adapter; P' = P r^2 tokens per tile)
    features = x.reshape(N P', Dv) @ W_proj            [N P', D_text]  (multi_modal_projector)

The features then overwrite, in order, the embeddings of the ``<|patch|>`` tokens (``merge_image_features``).
Parameters carry logical axis names from ``sharding.py``: the vision width reuses EMBED, heads HEADS, the MLP and
adapter widths MLP, and layer-norm weights NORM.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import sharding as sh
from .config import Llama4Config, VisionConfig
from .mlp import INIT

LN_EPS = 1e-5  # torch.nn.LayerNorm's default; HF ignores the vision config's norm_eps


def check_pixels(cfg: VisionConfig, shape: tuple[int, ...]) -> None:
    """pixel_values must be [N, num_channels, image_size, image_size]: the positional embedding and the RoPE table
    are built for exactly that tile size (the image processor cuts images into such tiles)."""
    S = cfg.image_size
    if len(shape) != 4 or tuple(shape[1:]) != (cfg.num_channels, S, S):
        raise ValueError(f"pixel_values: expected shape [N, {cfg.num_channels}, {S}, {S}] (N tiles of "
                         f"{S}x{S} pixels), got {list(shape)}")


def patches(pixels: jax.Array, patch: int) -> jax.Array:
    """[N, C, S, S] -> [N, P, C p p], as torch.nn.Unfold(p, stride p) then permute: patches in row-major
    (row, col) order, and inside a patch the flattening is (c, ky, kx) with c slowest."""
    N, C, S, _ = pixels.shape
    G = S // patch
    x = pixels.reshape(N, C, G, patch, G, patch).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(N, G * G, C * patch * patch)


def vision_rope(cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [P + 1, hd/2] fp32: the 2D RoPE of the P patches followed by the CLS token.

    Pair m < hd/4 rotates by (col + 1) * f[m], pair hd/4 + m by (row + 1) * f[m], with f[m] = theta^(-4m/hd)
    (m < hd/4) and col, row the patch's grid coordinates; the CLS token gets angle 0 (the identity).
    """
    G = cfg.image_size // cfg.patch_size
    hd = cfg.hidden_size // cfg.num_attention_heads
    if hd % 4:
        raise ValueError(f"vision head_dim {hd} (hidden_size / num_attention_heads) must be divisible by 4: "
                         f"2D RoPE gives half of each head's rotation pairs to columns and half to rows")
    quarter = hd // 4
    freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, 2 * quarter, 2, dtype=np.float32)
                                                   / np.float32(2 * quarter)))
    idx = np.arange(G * G)
    col, row = (idx % G + 1).astype(np.float32), (idx // G + 1).astype(np.float32)
    angles = np.concatenate([col[:, None] * freq, row[:, None] * freq], axis=-1).astype(np.float32)
    angles = np.concatenate([angles, np.zeros((1, 2 * quarter), np.float32)])  # CLS: identity rotation
    return np.cos(angles), np.sin(angles)


def apply_rope_2d(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs. x [N, T, H, hd]; cos/sin [T, hd/2]. fp32 math, result in x.dtype."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape).astype(x.dtype)


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
    """[N, P, D] on a G x G grid -> [N, P r^2, D / r^2] (r = ratio, s = 1/r an integer).

    Output token (i, j) (row-major on the (G/s) x (G/s) grid) is the concatenation, rows outer and columns
    inner, of the s x s block x[s i + dh, s j + dw]: channel dh s D + dw D + c. This is HF's pixel_shuffle.
    """
    N, P, D = x.shape
    G, s = round(P ** 0.5), round(1 / ratio)
    if G * G != P or abs(s * ratio - 1) > 1e-6 or G % s:
        raise ValueError(f"pixel_shuffle: need a square patch grid whose side is divisible by 1/ratio; got "
                         f"{P} patches and ratio {ratio}")
    x = x.reshape(N, G // s, s, G // s, s, D).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(N, P // (s * s), s * s * D)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (weight and bias, eps 1e-5). Statistics in fp32, result in x.dtype."""

    eps: float = LN_EPS
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (sh.NORM,)), (D,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (sh.NORM,)), (D,),
                          self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _param(module: nn.Module, name: str, shape, axes, init=INIT):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype).astype(
        module.dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention (no GQA, no mask), q/k/v/o with bias, 2D RoPE on q and k."""

    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [N, T, D]; cos/sin [T, hd/2] -> [N, T, D]."""
        D, H = x.shape[-1], self.heads
        hd = D // H
        zeros = nn.initializers.zeros
        wq, wk, wv = (_param(self, n, (D, H, hd), (sh.EMBED, sh.HEADS, sh.HEAD_DIM)) for n in ("q", "k", "v"))
        bq, bk, bv = (_param(self, n + "_bias", (H, hd), (sh.HEADS, sh.HEAD_DIM), zeros) for n in ("q", "k", "v"))
        wo = _param(self, "o", (H, hd, D), (sh.HEADS, sh.HEAD_DIM, sh.EMBED))
        bo = _param(self, "o_bias", (D,), (sh.EMBED,), zeros)
        q = jnp.einsum("ntd,dhk->nthk", x, wq) + bq
        k = jnp.einsum("ntd,dhk->nthk", x, wk) + bk
        v = jnp.einsum("ntd,dhk->nthk", x, wv) + bv
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        scores = jnp.einsum("nthk,nshk->nhts", q, k, preferred_element_type=jnp.float32) * hd ** -0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhts,nshk->nthk", probs, v)
        return jnp.einsum("nthk,hkd->ntd", out, wo) + bo


class VisionMLP(nn.Module):
    """fc2(gelu(fc1(x))) with biases and exact (erf) GELU."""

    hidden: int  # F
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F, zeros = x.shape[-1], self.hidden, nn.initializers.zeros
        h = jnp.einsum("...d,df->...f", x, _param(self, "fc1", (D, F), (sh.EMBED, sh.MLP)))
        h = jax.nn.gelu(h + _param(self, "fc1_bias", (F,), (sh.MLP,), zeros), approximate=False)
        y = jnp.einsum("...f,fd->...d", h, _param(self, "fc2", (F, D), (sh.MLP, sh.EMBED)))
        return y + _param(self, "fc2_bias", (D,), (sh.EMBED,), zeros)


class VisionLayer(nn.Module):
    """Pre-LN encoder layer: x += Attn(LN1(x)); x += MLP(LN2(x))."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = x + VisionAttention(self.cfg.num_attention_heads, name="attn", **kw)(
            LayerNorm(param_dtype=self.param_dtype, name="input_norm")(x), cos, sin)
        return x + VisionMLP(self.cfg.intermediate_size, name="mlp", **kw)(
            LayerNorm(param_dtype=self.param_dtype, name="post_norm")(x))


class VisionAdapter(nn.Module):
    """HF ``Llama4VisionMLP2``: gelu(gelu(x @ fc1) @ fc2), no biases; note the GELU after fc2 too."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [N, P', D / r^2] -> [N, P', projector_output_dim]."""
        cfg = self.cfg
        Din, Dmid, Dout = x.shape[-1], cfg.projector_input_dim, cfg.projector_output_dim
        if Dmid != Dout:  # HF builds fc2 as [out, out] and feeds it fc1's [in] outputs
            raise ValueError(f"vision adapter: projector_input_dim ({Dmid}) must equal projector_output_dim "
                             f"({Dout}), as in transformers' Llama4VisionMLP2")
        h = jax.nn.gelu(jnp.einsum("...i,io->...o", x, _param(self, "fc1", (Din, Dmid), (sh.EMBED, sh.MLP))),
                        approximate=False)
        return jax.nn.gelu(jnp.einsum("...i,io->...o", h, _param(self, "fc2", (Dmid, Dout), (sh.MLP, sh.EMBED))),
                           approximate=False)


class VisionModel(nn.Module):
    """HF ``Llama4VisionModel``: pixel_values [N, C, S, S] -> image hidden states [N, P', projector_output_dim]."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        check_pixels(cfg, pixel_values.shape)
        p, D = cfg.patch_size, cfg.hidden_size
        P = (cfg.image_size // p) ** 2
        x = patches(pixel_values.astype(self.dtype), p)
        x = jnp.einsum("npi,id->npd", x, _param(self, "patch_embed", (cfg.num_channels * p * p, D), (None, sh.EMBED)))
        cls = _param(self, "class_embedding", (D,), (sh.EMBED,))
        x = jnp.concatenate([x, jnp.broadcast_to(cls, (x.shape[0], 1, D))], axis=1)  # CLS last, at index P
        x = x + _param(self, "pos_embed", (P + 1, D), (None, sh.EMBED))
        x = LayerNorm(param_dtype=self.param_dtype, name="pre_norm")(x)
        cos, sin = (jnp.asarray(a) for a in vision_rope(cfg))
        for j in range(cfg.num_hidden_layers):
            x = VisionLayer(cfg, name=f"layers_{j}", **kw)(x, cos, sin)
        x = LayerNorm(param_dtype=self.param_dtype, name="post_norm")(x)[:, :P]  # drop CLS
        return VisionAdapter(cfg, name="adapter", **kw)(pixel_shuffle(x, cfg.pixel_shuffle_ratio))


class Projector(nn.Module):
    """HF ``Llama4MultiModalProjector``: a bias-free linear vision_output_dim -> text hidden size."""

    out: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = _param(self, "kernel", (x.shape[-1], self.out), (sh.MLP, sh.EMBED))
        return jnp.einsum("...i,io->...o", x, w)


class ImageEncoder(nn.Module):
    """pixel_values [N, C, S, S] -> image features [N P', text_hidden], ready to replace ``<|patch|>`` embeddings.

    Parameters: ``vision_model`` (the tower and adapter) and ``projector``.
    """

    cfg: VisionConfig
    text_hidden: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = VisionModel(self.cfg, name="vision_model", **kw)(pixel_values)
        return Projector(self.text_hidden, name="projector", **kw)(h.reshape(-1, h.shape[-1]))


def tokens_per_tile(cfg: VisionConfig) -> int:
    """P' = (S / p)^2 r^2: the ``<|patch|>`` tokens each tile contributes (144 for Llama 4)."""
    return round((cfg.image_size // cfg.patch_size) ** 2 * cfg.pixel_shuffle_ratio ** 2)


def check_image_tokens(input_ids, n_features: int, image_token_index: int) -> None:
    """The prompt must hold exactly one ``<|patch|>`` per image feature row (tiles x tokens_per_tile)."""
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_index))
    if n_tokens != n_features:
        raise ValueError(f"image tokens and image features do not match: input_ids hold {n_tokens} image tokens "
                         f"(id {image_token_index}) but the images give {n_features} feature rows")


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_token_index: int) -> jax.Array:
    """Overwrite the embeddings of the image tokens, in row-major [B, T] order, with the feature rows.

    embeds [B, T, D]; input_ids [B, T]; features [M, D], M = number of image tokens (checked when input_ids are
    concrete; under jit call ``check_image_tokens`` on the host first). Like HF's masked_scatter.
    """
    if not isinstance(input_ids, jax.core.Tracer):
        check_image_tokens(input_ids, features.shape[0], image_token_index)
    if features.shape[0] == 0:
        return embeds
    is_image = input_ids == image_token_index
    row = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1  # k-th image token takes feature row k
    picked = jnp.take(features.astype(embeds.dtype), jnp.clip(row, 0, features.shape[0] - 1), axis=0)
    return jnp.where(is_image[..., None], picked, embeds)


VISION_PARAMS = ("vision_model", "projector")  # ImageEncoder's top-level names; disjoint from Llama4Text's


def fuse_images(cfg: Llama4Config, embed: jax.Array, vision_params: dict, input_ids: jax.Array,
                pixel_values: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Early fusion: token embeddings [B, T, D] with the ``<|patch|>`` rows replaced by the image features.

    embed [V, D] is the text decoder's embedding table, vision_params the ``ImageEncoder``'s (``vision_model``,
    ``projector``). pixel_values [N, C, S, S] are the tiles of all images of all rows, in prompt order; input_ids
    [B, T] must hold exactly N * tokens_per_tile image tokens (checked here when concrete, by the caller under jit).
    The result goes to ``Llama4Text`` as ``inputs_embeds``, as HF's ``Llama4ForConditionalGeneration`` does.
    """
    if cfg.vision is None:
        raise ValueError("pixel_values given, but this model has no vision tower (its config has no vision_config)")
    encoder = ImageEncoder(cfg.vision, cfg.text.hidden_size, dtype=dtype, param_dtype=dtype)
    features = encoder.apply({"params": vision_params}, pixel_values)
    embeds = jnp.take(embed, input_ids, axis=0).astype(dtype)  # the lookup Llama4Text does itself
    return merge_image_features(embeds, input_ids, features, cfg.image_token_index)


__all__ = [
    "VISION_PARAMS",
    "ImageEncoder",
    "Projector",
    "VisionModel",
    "check_image_tokens",
    "check_pixels",
    "fuse_images",
    "merge_image_features",
    "patches",
    "pixel_shuffle",
    "tokens_per_tile",
    "vision_rope",
]
