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
Parameters carry logical axis names from ``axes.py``: the vision width reuses EMBED, heads HEADS, the MLP and
adapter widths MLP, and layer-norm weights NORM.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Llama4Config, VisionConfig
from .axes import EMBED, HEAD_DIM, HEADS, MLP, NORM
from .layers import param
from .rope import apply_rope, grid_angles

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
        scale = param(self, "scale", (D,), (NORM,), nn.initializers.ones, dtype=jnp.float32)
        bias = param(self, "bias", (D,), (NORM,), nn.initializers.zeros, dtype=jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(x.dtype)


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
        wq, wk, wv = (param(self, n, (D, H, hd), (EMBED, HEADS, HEAD_DIM)) for n in ("q", "k", "v"))
        bq, bk, bv = (param(self, n + "_bias", (H, hd), (HEADS, HEAD_DIM), zeros) for n in ("q", "k", "v"))
        wo = param(self, "o", (H, hd, D), (HEADS, HEAD_DIM, EMBED))
        bo = param(self, "o_bias", (D,), (EMBED,), zeros)
        q = jnp.einsum("ntd,dhk->nthk", x, wq) + bq
        k = jnp.einsum("ntd,dhk->nthk", x, wk) + bk
        v = jnp.einsum("ntd,dhk->nthk", x, wv) + bv
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
        h = jnp.einsum("...d,df->...f", x, param(self, "fc1", (D, F), (EMBED, MLP)))
        h = jax.nn.gelu(h + param(self, "fc1_bias", (F,), (MLP,), zeros), approximate=False)
        y = jnp.einsum("...f,fd->...d", h, param(self, "fc2", (F, D), (MLP, EMBED)))
        return y + param(self, "fc2_bias", (D,), (EMBED,), zeros)


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
        h = jax.nn.gelu(jnp.einsum("...i,io->...o", x, param(self, "fc1", (Din, Dmid), (EMBED, MLP))),
                        approximate=False)
        return jax.nn.gelu(jnp.einsum("...i,io->...o", h, param(self, "fc2", (Dmid, Dout), (MLP, EMBED))),
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
        x = jnp.einsum("npi,id->npd", x, param(self, "patch_embed", (cfg.num_channels * p * p, D), (None, EMBED)))
        cls = param(self, "class_embedding", (D,), (EMBED,))
        x = jnp.concatenate([x, jnp.broadcast_to(cls, (x.shape[0], 1, D))], axis=1)  # CLS last, at index P
        x = x + param(self, "pos_embed", (P + 1, D), (None, EMBED))
        x = LayerNorm(param_dtype=self.param_dtype, name="pre_norm")(x)
        cos, sin = (jnp.asarray(a) for a in grid_angles(cfg.image_size // p, D // cfg.num_attention_heads,
                                                           cfg.rope_theta))
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
        w = param(self, "kernel", (x.shape[-1], self.out), (MLP, EMBED))
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


def init_vision_params(encoder: ImageEncoder, key: jax.Array) -> dict:
    """Boxed random parameters of the vision tower and projector (``vision_model``, ``projector``)."""
    v = encoder.cfg
    return encoder.init(key, jnp.zeros((1, v.num_channels, v.image_size, v.image_size), encoder.dtype))["params"]


def abstract_vision_params(encoder: ImageEncoder) -> dict:
    """Boxed ShapeDtypeStructs of ``init_vision_params``; computes nothing."""
    return jax.eval_shape(lambda: init_vision_params(encoder, jax.random.key(0)))


def check_image_tokens(input_ids, n_features: int, image_token_index: int) -> None:
    """The prompt must hold exactly one ``<|patch|>`` per image feature row (tiles x tokens_per_tile)."""
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_index))
    if n_tokens and not n_features:
        raise ValueError(f"input_ids: {n_tokens} image placeholder tokens <|patch|> (id {image_token_index}) but no "
                         "images (pixel_values); placeholders come only from images, never from prompt text")
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
    "abstract_vision_params",
    "init_vision_params",
    "check_image_tokens",
    "check_pixels",
    "fuse_images",
    "merge_image_features",
    "patches",
    "pixel_shuffle",
]
